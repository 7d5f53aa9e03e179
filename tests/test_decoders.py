"""The Llama-shaped decoders (llama, qwen2, qwen3, mistral) against transformers: tiny random
checkpoints made by transformers' own classes here, loaded by minift, logits compared in float32
(right and left padding, with and without the KV cache), saved back and loaded by transformers;
KV-cache generation against the no-cache path and transformers' greedy generate; sharded and bf16
checkpoints; the refusals. A stored reference (tests/data/tiny_llama_reference.npz) checks one
llama forward where transformers is not installed."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minift
from minift.collate import Collator, PackingCollator, model_inputs
from minift.models import ConfigError, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, build_model
from minift.models.config import config_from_json_file

DATA = Path(__file__).parent / "data"
VOCAB = 61
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "initializer_range": 0.3}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}
CASES = {  # every family and switch, tiny; the windows are shorter than the 11-token rows
    "llama-mha-untied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
    "llama-gqa-tied-llama3-bias": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True,
                                             "attention_bias": True, "mlp_bias": True, "head_dim": 12,
                                             "rope_theta": 500.0, "rope_scaling": LLAMA3_SCALING}),
    "qwen2-gqa-tied": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen2-sliding": ("qwen2", {"num_key_value_heads": 2, "num_hidden_layers": 3, "use_sliding_window": True,
                                "sliding_window": 4, "max_window_layers": 1}),
    "qwen3-qk-norm-bias": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16, "attention_bias": True,
                                     "tie_word_embeddings": True}),
    "mistral-sliding": ("mistral", {"num_key_value_heads": 2, "sliding_window": 3}),
    "mistral-no-window": ("mistral", {"num_key_value_heads": 1, "sliding_window": None,
                                      "tie_word_embeddings": True}),
}


def _transformers_model(model_type: str, seed: int = 0, **fields):
    """transformers' model of ``model_type`` (eager attention: a computation path minift does not
    take), random init, then every bias and norm weight moved off its init so a dropped or swapped
    one shows."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[model_type]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**SMALL, **fields}),
                                                          attn_implementation="eager")
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _batch(seed: int = 1, time: int = 11):
    """Two rows: full, and 4 pads (on the right or the left)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, time), generator=g)
    right = torch.ones(2, time, dtype=torch.long)
    right[1, time - 4:] = 0
    return ids, right, right.flip(1)


def _compare_with_transformers(hf, model, ids, masks, atol=1e-5):
    for mask in masks:
        real = mask.bool()
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask).logits
            got = model(ids, attention_mask=mask)
        assert got.shape == expected.shape
        assert (got - expected)[real].abs().max() <= atol


def _cached_logits(model, ids, split: int):
    """Logits of ``ids`` computed in two calls through the KV cache (prompt, then the rest)."""
    cache = model.new_kv_cache()
    with torch.no_grad():
        first = model.hidden_states(ids[:, :split], kv_cache=cache)
        rest = model.hidden_states(ids[:, split:], kv_cache=cache)
    return F.linear(torch.cat([first, rest], dim=1), model.lm_head_weight)


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_round_trip(tmp_path, case):
    import transformers

    model_type, fields = CASES[case]
    hf = _transformers_model(model_type, **fields)
    hf.save_pretrained(tmp_path / "hf")
    model = minift.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == model_type and type(model).__name__ == type(hf).__name__
    ids, right, left = _batch()
    _compare_with_transformers(hf, model, ids, [right, left])
    with torch.no_grad():  # right padding: the pads' logits too (they see only earlier real tokens)
        assert (model(ids, attention_mask=right) - hf(ids, attention_mask=right).logits).abs().max() <= 1e-5
        expected = hf(ids).logits
    assert (_cached_logits(model, ids, split=6) - expected).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "minift")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "minift", attn_implementation="eager")
    with torch.no_grad():
        reloaded = back.eval()(ids, attention_mask=left).logits
        assert (reloaded - hf(ids, attention_mask=left).logits).abs().max() <= 1e-5
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("case", ["llama-gqa-tied-llama3-bias", "qwen2-sliding", "mistral-sliding"])
def test_the_comparison_sees_the_switches(tmp_path, case):
    """The same comparison fails when minift drops the rope scaling or the window: the tiny models
    are sensitive to what is being checked."""
    model_type, fields = CASES[case]
    hf = _transformers_model(model_type, **fields)
    hf.save_pretrained(tmp_path)
    without = {"llama": {"rope_scaling": None}, "qwen2": {"use_sliding_window": False},
               "mistral": {"sliding_window": None}}[model_type]
    model = minift.from_pretrained(tmp_path, **without)
    ids, right, _ = _batch()
    with pytest.raises(AssertionError):
        _compare_with_transformers(hf, model, ids, [right], atol=1e-3)


def _random_case(seed: int) -> tuple[str, dict]:
    """A config the fixed cases never saw: sizes, head counts, head_dim, rope theta and scaling, window."""
    rng = random.Random(seed)
    model_type = rng.choice(["llama", "qwen2", "qwen3", "mistral"])
    kv_heads = rng.choice([1, 2, 3])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([4, 6, 8, 10])
    fields = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": heads * head_dim,
                  "intermediate_size": rng.randrange(8, 48), "num_hidden_layers": rng.randrange(1, 4),
                  "rope_theta": rng.choice([100.0, 10000.0, 1e6]), "tie_word_embeddings": rng.random() < 0.5,
                  "rms_norm_eps": rng.choice([1e-6, 1e-5])}
    if model_type in ("llama", "qwen3", "mistral") and rng.random() < 0.5:
        fields["head_dim"] = rng.choice([4, 8, 12])  # not hidden_size / heads
    if model_type == "llama":
        fields.update(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)
        if rng.random() < 0.6:
            low = rng.choice([0.5, 1.0, 2.0])
            fields["rope_scaling"] = {"rope_type": "llama3", "factor": rng.choice([2.0, 8.0, 32.0]),
                                      "low_freq_factor": low, "high_freq_factor": low * rng.choice([2, 4]),
                                      "original_max_position_embeddings": rng.choice([4, 16, 64])}
    if model_type in ("qwen2", "qwen3") and rng.random() < 0.6:
        fields.update(use_sliding_window=True, sliding_window=rng.randrange(1, 9),
                      max_window_layers=rng.randrange(0, fields["num_hidden_layers"] + 1))
    if model_type == "qwen3":
        fields["attention_bias"] = rng.random() < 0.5
    if model_type == "mistral":
        fields["sliding_window"] = rng.choice([None, 1, 2, 5, 9])
    return model_type, fields


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("seed", [0, 1] + [pytest.param(s, marks=pytest.mark.slow) for s in range(2, 40)])
def test_randomized_configs_match_transformers(tmp_path, seed):
    model_type, fields = _random_case(seed)
    hf = _transformers_model(model_type, seed=seed, **fields)
    hf.save_pretrained(tmp_path)
    model = minift.from_pretrained(tmp_path)
    ids, right, left = _batch(seed, time=random.Random(seed).randrange(2, 20))
    _compare_with_transformers(hf, model, ids, [right, left])
    with torch.no_grad():
        expected = hf(ids).logits
    assert (_cached_logits(model, ids, split=ids.shape[1] // 2) - expected).abs().max() <= 1e-5


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("case", ["llama-gqa-tied-llama3-bias", "qwen2-sliding", "qwen3-qk-norm-bias",
                                  "mistral-sliding"])
def test_cached_generation_equals_no_cache_and_transformers(tmp_path, case):
    model_type, fields = CASES[case]
    hf = _transformers_model(model_type, **fields)
    hf.save_pretrained(tmp_path)
    model = minift.from_pretrained(tmp_path)
    prompt = _batch()[0][0, :5].tolist()
    cached = model.generate(prompt, max_new_tokens=16, temperature=0)
    assert cached == model.generate(prompt, max_new_tokens=16, temperature=0, use_cache=False)
    greedy = list(prompt)  # transformers' forward, the whole sequence each step
    with torch.no_grad():
        for _ in range(16):
            greedy.append(int(hf(torch.tensor([greedy])).logits[0, -1].argmax()))
    assert cached == greedy
    if not any(model.config.layer_windows()):
        # (with a window shorter than the sequence, transformers 5.24's generate departs from its own
        # forward, with or without its cache fed token by token; the forward is the reference then)
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                pad_token_id=0)
        assert cached == reference[0].tolist()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert model.generate(prompt, 12, temperature=1.0, generator=g1) == \
        model.generate(prompt, 12, temperature=1.0, generator=g2, use_cache=False)


@pytest.mark.requires("transformers")
def test_sharded_and_base_model_checkpoints(tmp_path):
    import transformers

    hf = _transformers_model("llama", num_key_value_heads=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids, right, _ = _batch()
    _compare_with_transformers(hf, minift.from_pretrained(tmp_path / "sharded"), ids, [right])
    hf.model.save_pretrained(tmp_path / "base")  # LlamaModel: keys without the "model." prefix
    assert isinstance(hf.model, transformers.LlamaModel)
    _compare_with_transformers(hf, minift.from_pretrained(tmp_path / "base"), ids, [right])


@pytest.mark.requires("transformers")
def test_bf16_checkpoint_loads_without_a_float32_copy(tmp_path, monkeypatch):
    hf = _transformers_model("qwen2", num_key_value_heads=2)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    seen = []
    original = minift.models.CausalLM.load_checkpoint_state_dict

    def spy(self, tensors, assign=False):
        seen.extend(t.dtype for t in tensors.values())
        return original(self, tensors, assign)

    monkeypatch.setattr(minift.models.CausalLM, "load_checkpoint_state_dict", spy)
    model = minift.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert set(seen) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # angles stay exact
    ids, right, _ = _batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=right).logits.float()
        got = model(ids, attention_mask=right).float()
    assert (got - expected)[right.bool()].abs().max() < 0.1  # bf16 arithmetic on both sides
    as_float = minift.from_pretrained(tmp_path)  # default float32: the bf16 values, exactly
    for name, p in as_float.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, model.state_dict()[name].float()), name


# -- without transformers ------------------------------------------------------------------------------
def _write_config(tmp_path, raw) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("raw,message", [
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling.rope_type = 'yarn' is not implemented"),
    ({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type = 'dynamic' is not implemented"),
    ({"model_type": "qwen2", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope_scaling.rope_type = 'longrope' is not implemented"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling of type llama3 needs numbers for ['low_freq_factor', 'high_freq_factor']"),
    ({"model_type": "qwen2", "num_experts": 8}, "num_experts = 8 (mixture of experts) is not implemented"),
    ({"model_type": "mistral", "num_local_experts": 8}, "num_local_experts = 8 (mixture of experts)"),
    ({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}, "quantization_config ="),
    ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4},
     "num_attention_heads (6) must be a multiple of num_key_value_heads (4)"),
    ({"model_type": "llama", "hidden_act": "squared_relu"}, "hidden_act 'squared_relu' is not implemented"),
    ({"model_type": "qwen2", "num_hidden_layers": 2, "layer_types": ["full_attention", "chunked"]},
     "layer_types must list one of"),
    ({"model_type": "mixtral"}, "model_type 'mixtral' is not supported; minift knows"),
])
def test_unimplemented_features_are_refused_naming_the_field(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_json_file(_write_config(tmp_path, raw))


def test_config_fields_and_defaults_follow_each_family():
    llama = LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4})
    assert (llama.head_dim, llama.num_key_value_heads, llama.qkv_bias, llama.qk_norm) == (16, 4, False, False)
    assert Qwen2Config().qkv_bias and not Qwen2Config().o_bias and Qwen3Config().head_dim == 128
    assert Qwen3Config().qk_norm and MistralConfig().sliding_window == 4096
    qwen = Qwen2Config.from_dict({"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8,
                                  "max_window_layers": 2})
    assert qwen.layer_windows() == [None, None, 8, 8]
    unused_window = Qwen2Config.from_dict({"num_hidden_layers": 2, "sliding_window": 8})
    assert unused_window.layer_windows() == [None, None]
    v5 = LlamaConfig.from_dict({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert v5.rope_theta == 5e5 and v5.rope_scaling["rope_type"] == "llama3"
    assert "rope_parameters" not in v5.extra
    config = LlamaConfig(vocab_size=100, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    assert config.parameter_count() == build_model(config).num_parameters()
    q3 = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True,
                     tie_word_embeddings=True)
    assert q3.parameter_count() == build_model(q3).num_parameters()


def test_flops_per_token_equal_the_counted_matmuls():
    """The benchmark's FLOPs per trained token (GQA's narrow k/v, SwiGLU's three matrices, the head), against
    torch's FLOP counter over a forward and backward: every matrix multiply, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    config = LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = build_model(config)
    ids = torch.randint(0, 50, (3, 7))
    with FlopCounterMode(display=False) as counter:
        model(ids).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    assert matmuls == config.flops_per_token() * ids.numel()
    assert config.flops_per_token(7) > config.flops_per_token()  # attention's T-dependent part on top


def test_gpt_dropout_settings_in_decoder_terms():
    """Recipes that switch dropout off by GPT's names (the preference stage) work for the decoders."""
    config = LlamaConfig.from_dict({"attn_pdrop": 0.1, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, strict=True)
    assert config.attention_dropout == 0.1 and "resid_pdrop" not in config.extra
    assert config.replace(attn_pdrop=0.0, resid_pdrop=0.0).attention_dropout == 0.0
    with pytest.raises(ConfigError, match="resid_pdrop = 0.1: the Llama-shaped decoders have no"):
        config.replace(resid_pdrop=0.1)


def _tiny(config_cls=LlamaConfig, **fields):
    torch.manual_seed(0)
    config = config_cls(**{**SMALL, "num_key_value_heads": 2, **fields})
    return build_model(config).eval()


def test_left_padding_with_positions_equals_the_unpadded_row():
    """Independent of transformers: a left-padded row, its positions counted from its first real token,
    gives the unpadded row's logits; so does the eager attention path."""
    model = _tiny(Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    ids, _, left = _batch()
    positions = (left.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=left, position_ids=positions)
        alone = model(ids[1:, 4:])
        model.set_hot_path(attention="eager")
        eager = model(ids, attention_mask=left, position_ids=positions)
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(eager[left.bool()], padded[left.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("config_cls,fields", [(LlamaConfig, {}),
                                               (MistralConfig, {"sliding_window": 3})])
def test_packed_rows_equal_each_document_alone_float64(config_cls, fields):
    model = _tiny(config_cls, **fields).double()
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(), "prompt_length": n // 2}
                for n in (5, 9, 3, 7, 6, 2)]
    packed = PackingCollator(pad_id=0, row_length=16, rows_per_batch=3, objective="completion")(examples)
    with torch.no_grad():
        out = model(**model_inputs(packed, "cpu"))
        single = Collator(pad_id=0, objective="completion")
        alone = sum(model(**model_inputs(single([e]), "cpu")).loss_sum.item() for e in examples)
    assert out.n_loss_targets == packed["n_loss_targets"]
    assert out.loss_sum.item() == pytest.approx(alone, rel=1e-12)


@pytest.mark.slow
def test_compile_holds_over_the_static_path():
    """Packed rows of one shape through loop.train with the decoder compiled: 0 graph breaks, one graph."""
    from torch._dynamo.utils import counters
    from torch.utils.data import DataLoader

    from minift.loop import train
    from minift.optim import make_adamw, make_scheduler
    from minift.sampling import PackedSampler

    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(1, VOCAB, (int(n),), generator=g).tolist()}
                for n in torch.randint(2, 15, (24,), generator=g)]
    sampler = PackedSampler([len(e["input_ids"]) for e in examples], batch_size=2, seed=0, row_length=16)
    loader = DataLoader(examples, batch_sampler=sampler,
                        collate_fn=PackingCollator(pad_id=0, row_length=16, rows_per_batch=2))
    model = _tiny(Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1).pad_vocab(64)
    model.train().set_hot_path(loss_rows="all", fused_head=True)
    optimizer = make_adamw(model, 1e-3, 0.0, (0.9, 0.999), 1e-8, "no")
    torch._dynamo.reset()
    counters.clear()
    scheduler = make_scheduler(optimizer, "constant", len(sampler), 0)
    train(torch.compile(model, backend="aot_eager"), optimizer, scheduler, loader, total_steps=len(sampler))
    assert len(sampler) > 3
    assert not counters.get("graph_break"), dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1 and not counters.get("recompiles")


def test_save_load_round_trip_keeps_padding_rows_out(tmp_path):
    model = _tiny(LlamaConfig, tie_word_embeddings=False).pad_vocab(64)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["model.embed_tokens.weight"].shape[0] == saved["lm_head.weight"].shape[0] == VOCAB
    assert not any("rotary" in k for k in saved)
    again = minift.from_pretrained(tmp_path)
    ids = _batch()[0]
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


# -- a stored reference, for machines without transformers ------------------------------------------
REFERENCE = DATA / "tiny_llama_reference.npz"
REFERENCE_CONFIG = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
                    "initializer_range": 0.5, "attention_bias": True, "mlp_bias": True,
                    "tie_word_embeddings": False, "rope_theta": 1000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 2.0, "original_max_position_embeddings": 4}}


def _reference_from_transformers():
    """The stored reference's content: a tiny llama's weights (transformers' init + moved biases and
    norms), a left-padded batch, and transformers' float32 logits (eager attention)."""
    import transformers

    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**REFERENCE_CONFIG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 0, 5, 3, 5, 8, 9]])
    mask = (torch.arange(8) >= torch.tensor([[0], [3]])).long()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
    weights = {k: v.numpy() for k, v in hf.state_dict().items()}
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "logits": logits.numpy(), **weights}


@pytest.mark.requires("transformers")
def test_stored_reference_is_what_transformers_computes():
    stored = dict(np.load(REFERENCE))
    fresh = _reference_from_transformers()
    assert stored.keys() == fresh.keys()
    for key, value in fresh.items():
        np.testing.assert_allclose(stored[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_llama_forward_equals_the_stored_transformers_reference(tmp_path):
    stored = dict(np.load(REFERENCE))
    model = build_model(LlamaConfig(**REFERENCE_CONFIG))
    weights = {k: torch.from_numpy(v) for k, v in stored.items() if k.startswith(("model.", "lm_head"))}
    model.load_checkpoint_state_dict(weights)
    mask = torch.from_numpy(stored["attention_mask"])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(stored["input_ids"]), attention_mask=mask)
    expected = torch.from_numpy(stored["logits"])
    assert (logits - expected)[mask.bool()].abs().max() <= 1e-5
    assert expected.abs().max() > 1.0  # the reference is not trivially small


def test_a_sharded_hub_checkpoint_fetches_its_shards(tmp_path, monkeypatch):
    """From the hub, the index names the shards and each is fetched (a stand-in for huggingface_hub's
    download serves the files of a local folder one by one)."""
    import huggingface_hub

    import minift.hub

    model = _tiny(LlamaConfig)
    model.save_pretrained(tmp_path / "source")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "source" / "model.safetensors"))
    (tmp_path / "source" / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / "source" / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "source" / "model.safetensors.index.json").write_text(json.dumps(index))
    fetched = []

    def download(repo_id, filename, local_files_only=False):
        source = tmp_path / "source" / filename
        if repo_id != "org/sharded" or not source.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id}/{filename}")
        fetched.append(filename)
        target = tmp_path / "snapshot" / filename
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(source.read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(minift.hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    loaded = minift.from_pretrained("org/sharded")
    assert set(shards) <= set(fetched)
    ids = _batch()[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.slow
def test_chat_recipe_compiled_on_the_static_path_has_no_graph_break(tmp_path):
    """configs/llama-chat-tiny.toml with model.compile (inductor) on packed rows: 0 graph breaks, the training
    graph plus at most one for evaluation."""
    from torch._dynamo.utils import counters

    from minift.config import load_config
    from minift.finetune import run

    from conftest import REPO

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(REPO / "configs" / "llama-chat-tiny.toml", [
        f'train.output_dir="{tmp_path}"', "train.progress=false", "train.plot=false", "model.compile=true",
        "data.sampler=packed", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=12",
        "eval.max_examples=32", "train.eval_every=0"])
    summary = run(cfg, log=lambda *_: None)
    assert summary["last_loss"] < summary["first_loss"]
    assert not counters.get("graph_break"), dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2
