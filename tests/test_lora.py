"""LoRA (minift.lora) against peft: the same forward, gradients and AdamW steps from the same
adapter (live, or through the trace peft wrote in tests/data), the saved adapter in peft's layout
both ways, merged weights in transformers, and what minift refuses."""
from __future__ import annotations

import copy
import json

import numpy as np
import peft_lora
import pytest
import torch
from peft_lora import CASES, TRACED, batch, initial_adapter, read_trace, run_minift, run_peft
from torch import nn

import minift
from minift.errors import InputError
from minift.lora import (
    LoraLinear,
    LoraSettings,
    LoraSettingsError,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter,
    load_adapter_state_dict,
    load_peft_state_dict,
    merge_adapters,
    peft_state_dict,
    save_adapter,
    trainable_parameters,
)
from minift.optim import make_adamw

from conftest import shared_path

TOLERANCE = 1e-5  # float32 on both sides; observed <= 4.6e-6 (final weights), <= 1.2e-7 (logits, grads)


def _assert_runs_match(mine: dict, theirs: dict, what: str) -> None:
    for key in ("logits_head", "logits_lse", "losses"):
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=TOLERANCE, msg=f"{what}: {key}")
    for part in ("grads", "final"):
        assert mine[part].keys() == theirs[part].keys(), f"{what}: {part} keys differ"
        for name, tensor in theirs[part].items():
            torch.testing.assert_close(mine[part][name], tensor, rtol=0, atol=TOLERANCE,
                                       msg=f"{what}: {part} {name}")


def _needs_fixture(case: str) -> None:
    if CASES[case]["fixture"] is not None:
        shared_path("fixtures", CASES[case]["fixture"])


# -- exact against peft ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", TRACED)
def test_against_peft_trace(case):
    """minift against peft's numbers stored in tests/data (regenerate: python3 tests/peft_lora.py)."""
    _needs_fixture(case)
    _assert_runs_match(run_minift(case), read_trace(case), f"{case} vs the peft trace")


@pytest.mark.requires("peft", "transformers")
@pytest.mark.parametrize("case", list(CASES))
def test_against_peft_live(case):
    """peft's get_peft_model on the transformers model (the toy, a Llama) beside minift's adapter;
    the stored trace is checked to be what peft computes here."""
    _needs_fixture(case)
    theirs = run_peft(case)
    mine = run_minift(case, peft_lora.llama_model() if case == "llama-hf" else None)
    _assert_runs_match(mine, theirs, f"{case} vs peft")
    if case in TRACED:
        theirs.pop("initial")
        _assert_runs_match(read_trace(case), theirs, f"{case}: the stored trace vs peft")


@pytest.mark.requires("peft", "transformers")
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initial_adapter_is_drawn_as_peft_draws_it(init):
    """B starts at zero; A from the same distribution as peft's (Kaiming-uniform a=sqrt(5), i.e.
    U(-1/sqrt(in), 1/sqrt(in)), or N(0, 1/r^2)), compared on 3 x 64 x 256 draws per side."""
    from peft import LoraConfig, get_peft_model

    def layers():
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Linear(256, 256) for _ in range(3)))

    r = 64
    mine = apply_lora(layers(), LoraSettings(r=r, target_modules=["0", "1", "2"], init=init),
                      generator=torch.Generator().manual_seed(1))
    theirs = get_peft_model(layers(), LoraConfig(r=r, target_modules=["0", "1", "2"],
                                                 init_lora_weights=True if init == "kaiming" else init))
    samples = {}
    for side, model in (("minift", mine), ("peft", theirs)):
        a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])
        b = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_B" in n])
        assert a.numel() == 3 * r * 256 and not b.any()
        samples[side] = a
    if init == "kaiming":
        bound = 256 ** -0.5
        for a in samples.values():
            assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    expected_std = 256 ** -0.5 / 3 ** 0.5 if init == "kaiming" else 1 / r
    for side, a in samples.items():
        assert float(a.std()) == pytest.approx(expected_std, rel=0.02), side
        assert float(a.mean()) == pytest.approx(0.0, abs=0.02 * expected_std), side


def test_a_new_adapter_changes_nothing_and_one_generator_gives_one_adapter():
    base = peft_lora.toy_model()
    ids = batch("toy")[0]
    expected = base(ids)
    one = apply_lora(copy.deepcopy(base), LoraSettings(r=2, target_modules=["q_proj"]),
                     generator=torch.Generator().manual_seed(7))
    two = apply_lora(copy.deepcopy(base), LoraSettings(r=2, target_modules=["q_proj"]),
                     generator=torch.Generator().manual_seed(7))
    assert torch.equal(one(ids), expected)
    for (name, p), (_, q) in zip(trainable_parameters(one).items(), trainable_parameters(two).items()):
        assert torch.equal(p, q), name


# -- what apply_lora does to the model ----------------------------------------------------------------------
def _gpt2(**overrides):
    settings = {**peft_lora.NO_DROPOUT, **overrides}
    return minift.from_pretrained(shared_path("fixtures", "tiny-gpt2"), **settings)


def _reference_batch(fixture="tiny-gpt2"):
    ref = np.load(shared_path("fixtures", fixture, "reference_logits.npz"))
    return torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]), ref


@pytest.mark.parametrize("bias,trained_biases", [("none", 0), ("lora_only", 4), ("all", 13)])
def test_only_the_adapter_trains(bias, trained_biases):
    """The optimizer holds the adapter's parameters only; the base gets no gradient and keeps its
    values. GPT-2's 2 layers: c_attn + attn.c_proj wrapped (4 biases), 13 biases in all (with ln_f)."""
    model = _gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSettings(r=2, target_modules=["c_attn", "attn.c_proj"], bias=bias))
    trained = trainable_parameters(model)
    assert sum(n.endswith("bias") for n in trained) == trained_biases
    assert sum("lora_" in n for n in trained) == 2 * 2 * 2
    optimizer = make_adamw(model, lr=1e-2, weight_decay=0.1)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trained.values()}
    ids, mask, _ = _reference_batch()
    model.train()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    (out.loss_sum / out.n_loss_targets).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name not in trained:
            assert p.grad is None, name
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name


def test_adapters_disabled_is_the_base_model():
    """With the adapter switched off the logits are transformers' for the base checkpoint again."""
    settings = LoraSettings(r=4, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])
    model = apply_lora(_gpt2(), settings)
    load_peft_state_dict(model, initial_adapter(peft_state_dict(model)))
    with torch.no_grad():
        model.transformer.ln_f.modules_to_save.weight.mul_(1.5)
    ids, mask, ref = _reference_batch()
    model.eval()
    with torch.no_grad():
        adapted = model(ids, attention_mask=mask)
        with adapters_disabled(model):
            base = model(ids, attention_mask=mask)
        assert torch.equal(model(ids, attention_mask=mask), adapted)
    torch.testing.assert_close(base, torch.from_numpy(ref["logits"]), rtol=0, atol=1e-5)
    assert (adapted - base).abs().max() > 0.1


def test_adapter_checkpoint_resumes_bit_identically():
    """adapter_state_dict + the optimizer's state are all a LoRA checkpoint needs: restored into a
    fresh model (another initial adapter) the next steps are bit-identical."""
    settings = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["c_attn", "c_proj"], bias="lora_only")
    ids, mask, _ = _reference_batch()
    labels = ids.masked_fill(mask == 0, -100)

    def steps(model, optimizer, first, n):
        model.train()
        for step in range(first, first + n):
            torch.manual_seed(step)
            out = model(ids, attention_mask=mask, labels=labels)
            (out.loss_sum / out.n_loss_targets).backward()
            optimizer.step()
            optimizer.zero_grad()

    model = apply_lora(_gpt2(), settings, generator=torch.Generator().manual_seed(0))
    optimizer = make_adamw(model, lr=1e-2)
    steps(model, optimizer, 0, 2)
    saved = copy.deepcopy((adapter_state_dict(model), optimizer.state_dict()))
    assert all(n.endswith(("lora_A.weight", "lora_B.weight", "base_layer.bias")) for n in saved[0])
    steps(model, optimizer, 2, 2)

    resumed = apply_lora(_gpt2(), settings, generator=torch.Generator().manual_seed(99))
    load_adapter_state_dict(resumed, saved[0])
    resumed_optimizer = make_adamw(resumed, lr=1e-2)
    resumed_optimizer.load_state_dict(saved[1])
    steps(resumed, resumed_optimizer, 2, 2)
    for (name, p), q in zip(adapter_state_dict(model).items(), adapter_state_dict(resumed).values()):
        assert torch.equal(p, q), name
    with pytest.raises(LoraSettingsError, match="missing transformer.h.0.attn.c_attn.lora_A.weight"):
        partial = {k: v for k, v in saved[0].items() if "h.0.attn.c_attn.lora_A" not in k}
        load_adapter_state_dict(resumed, partial)


# -- on disk: peft's layout ---------------------------------------------------------------------------------
def _adapted_minift(case: str) -> nn.Module:
    """minift's model of ``case`` with the test adapter after one AdamW step (biases and copies moved too)."""
    model = peft_lora.minift_model(case)
    apply_lora(model, LoraSettings(**CASES[case]["lora"]))
    load_peft_state_dict(model, initial_adapter(peft_state_dict(model)))
    ids, mask, labels = batch(case)
    optimizer = make_adamw(model, lr=1e-2)
    model.train()
    out = model(ids, attention_mask=mask, labels=labels)
    (out.loss_sum / out.n_loss_targets).backward()
    optimizer.step()
    return model.eval()


def _logits(model, case):
    ids, mask, _ = batch(case)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_saved_adapter_has_peft_layout_and_loads_back(tmp_path):
    from safetensors.torch import load_file

    model = _adapted_minift("gpt2")
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-gpt2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["lora_dropout"] == 0.1
    assert (config["target_modules"], config["bias"], config["modules_to_save"]) == \
        (["c_attn", "c_fc", "c_proj"], "lora_only", ["ln_f"])
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D: weights stored [in, out]
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
            "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight",
            "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
            "base_model.model.transformer.ln_f.weight"} <= keys
    assert len(keys) == 2 * 4 * 3 + 2
    fresh = load_adapter(_gpt2(), tmp_path)
    assert torch.equal(_logits(fresh.eval(), "gpt2"), _logits(model, "gpt2"))


@pytest.mark.requires("peft", "transformers")
@pytest.mark.parametrize("case", ["gpt2", "gpt1"])
def test_peft_loads_minifts_adapter(tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _needs_fixture(case)
    model = _adapted_minift(case)
    fixture = shared_path("fixtures", CASES[case]["fixture"])
    save_adapter(model, tmp_path, base_model_name_or_path=str(fixture))
    base = AutoModelForCausalLM.from_pretrained(fixture, attn_implementation="eager", dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, case), _logits(model, case), rtol=0, atol=TOLERANCE)


@pytest.mark.requires("peft", "transformers")
@pytest.mark.parametrize("case", ["gpt2", "gpt1", "toy"])
def test_minift_loads_pefts_adapter(tmp_path, case):
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    _needs_fixture(case)
    fixture = CASES[case]["fixture"]
    if fixture is None:
        base = peft_lora.toy_model()
    else:
        base = AutoModelForCausalLM.from_pretrained(shared_path("fixtures", fixture), dtype=torch.float32,
                                                    attn_implementation="eager", **peft_lora.NO_DROPOUT)
    theirs = get_peft_model(base, peft_lora.peft_config(case))
    from peft import get_peft_model_state_dict
    set_peft_model_state_dict(theirs, initial_adapter(get_peft_model_state_dict(theirs)))
    with torch.no_grad():  # trained biases and copies away from the base's values
        for name, p in theirs.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    mine = load_adapter(peft_lora.minift_model(case), tmp_path)
    assert mine.lora_settings == LoraSettings(**CASES[case]["lora"])
    theirs.eval()
    mine.eval()
    if fixture is None:
        ids = batch(case)[0]
        with torch.no_grad():
            torch.testing.assert_close(mine(ids), theirs(ids), rtol=0, atol=TOLERANCE)
    else:
        torch.testing.assert_close(_logits(mine, case), _logits(theirs, case), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", ["gpt2", "gpt1"])
def test_merged_model_computes_what_the_adapted_one_did(case):
    _needs_fixture(case)
    model = _adapted_minift(case)
    expected = _logits(model, case)
    merged = merge_adapters(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, case), expected, rtol=0, atol=TOLERANCE)


def test_merging_nn_linear_layers():
    """The [out, in] layout: the toy's regex-targeted nn.Linear layers and its trained head copy."""
    model = apply_lora(peft_lora.toy_model(), LoraSettings(**CASES["toy"]["lora"]))
    load_peft_state_dict(model, initial_adapter(peft_state_dict(model)))
    with torch.no_grad():
        model.lm_head.modules_to_save.weight.mul_(1.5)
    ids = batch("toy")[0]
    model.eval()
    with torch.no_grad():
        expected = model(ids)
        merged = merge_adapters(model)
        assert isinstance(merged.lm_head, nn.Linear) and isinstance(merged.layers[0].q_proj, nn.Linear)
        torch.testing.assert_close(merged(ids), expected, rtol=0, atol=1e-6)


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("case", ["gpt2", "gpt1"])
def test_merged_weights_load_in_transformers(tmp_path, case):
    from transformers import AutoModelForCausalLM

    _needs_fixture(case)
    model = _adapted_minift(case)
    expected = _logits(model, case)
    merge_adapters(model).save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    theirs.eval()
    torch.testing.assert_close(_logits(theirs, case), expected, rtol=0, atol=TOLERANCE)


# -- refused in one line -------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings,message", [
    ({"target_modules": ["q_proj"]}, ("'q_proj' matches no module of GPT2LMHeadModel; its linear layers are "
                                      "named c_attn, c_fc, c_proj")),
    ({"target_modules": r"h\.\d+\.attn\.q"}, "the regex .* matches no module of GPT2LMHeadModel"),
    ({"target_modules": ["ln_1"]}, (r"transformer.h.0.ln_1 \(LayerNorm\) is not a linear layer; LoRA wraps "
                                    r"linear layers \(c_attn, c_fc, c_proj\)")),
    ({"target_modules": ["wte"]}, r"transformer.wte \(Embedding\) is not a linear layer"),
    ({"modules_to_save": ["wte"]}, "transformer.wte is the token embedding the tied LM head reads"),
    ({"modules_to_save": ["ln_3"]}, "modules_to_save: 'ln_3' matches no module of GPT2LMHeadModel"),
])
def test_settings_that_match_nothing_or_the_wrong_thing_are_refused(settings, message):
    with pytest.raises(LoraSettingsError, match=message) as err:
        apply_lora(_gpt2(), LoraSettings(**{"target_modules": ["c_attn"], **settings}))
    assert "\n" not in str(err.value)


def test_lora_on_minifts_lm_head_is_refused():
    config = minift.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                               tie_word_embeddings=False)
    with pytest.raises(LoraSettingsError, match="lm_head — minift's LM head runs inside the loss"):
        apply_lora(minift.build_model(config), LoraSettings(target_modules=["c_attn", "lm_head"]))
    model = apply_lora(minift.build_model(config), LoraSettings(target_modules="all-linear"))
    assert "lm_head.lora_A.weight" not in trainable_parameters(model)


@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r must be a positive integer"), ("alpha", -1, "alpha must be a positive number"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"), ("bias", "some", "bias must be one of"),
    ("init", "pissa", "init must be one of"),
    ("target_modules", [], "target_modules must be a non-empty list"),
    ("target_modules", "(", "not a valid regular expression"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(LoraSettingsError, match=message):
        LoraSettings(**{field: value})


def test_unsupported_peft_adapters_are_refused(tmp_path):
    model = _adapted_minift("gpt2")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoraSettingsError, match="use_dora = True is a peft feature minift does not"):
        load_adapter(_gpt2(), tmp_path)
    with pytest.raises(LoraSettingsError, match="already holds an adapter"):
        apply_lora(model, LoraSettings())
    with pytest.raises(InputError, match="holds a LoRA adapter, whose wrapped layers transformers"):
        model.save_pretrained(tmp_path / "full")


# -- with the hot path's levers ------------------------------------------------------------------------------
def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels, right_padded=True)
    loss = out.loss_sum / out.n_loss_targets
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


def test_lora_with_fused_head_and_padded_vocabulary():
    """The fused LM head (its own backward) and a padded vocabulary give the plain path's loss and
    adapter gradients (float64); the frozen head gets no gradient (no [vocab x width] buffer either)."""
    ids, mask, _ = _reference_batch()
    labels = ids.masked_fill(mask == 0, -100)
    settings = LoraSettings(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only")
    plain = apply_lora(_gpt2().double().set_hot_path(loss_rows="labelled", fused_head=False), settings)
    load_peft_state_dict(plain, initial_adapter(peft_state_dict(plain)))
    fused = _gpt2().double().pad_vocab(64).set_hot_path(loss_rows="all", fused_head=True)
    apply_lora(fused, settings)
    load_peft_state_dict(fused, peft_state_dict(plain))
    assert fused.padded_head_weight.shape[0] == 50304
    loss, grads = _loss_and_grads(plain.train(), ids, mask, labels)
    fused_loss, fused_grads = _loss_and_grads(fused.train(), ids, mask, labels)
    torch.testing.assert_close(fused_loss, loss, rtol=0, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=1e-12, msg=name)
    assert fused.transformer.wte.weight.grad is None


@pytest.mark.slow
def test_lora_compiles_without_graph_breaks():
    """torch.compile (aot_eager: the graph capture and autograd of inductor, no code generation)
    of an adapted model: one graph, the eager loss and gradients."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    ids, mask, _ = _reference_batch()
    labels = ids.masked_fill(mask == 0, -100)
    settings = LoraSettings(r=4, dropout=0.1, target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"])
    model = apply_lora(_gpt2().set_hot_path(loss_rows="all", fused_head=True), settings)
    load_peft_state_dict(model, initial_adapter(peft_state_dict(model)))
    model.train()
    torch.manual_seed(3)
    loss, grads = _loss_and_grads(model, ids, mask, labels)
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, ids, mask, labels)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-7, msg=name)
