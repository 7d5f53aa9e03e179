"""The training loop: Trainer parity, accumulation, precision, non-finite losses, schedules."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import minift
from minift.collate import Collator
from minift.config import load_config
from minift.finetune import run
from minift.loop import NonFiniteLoss, train
from minift.models import GPT2Config, GPTConfig, build_model
from minift.optim import decay_parameter_names, lr_lambda, make_adamw, make_scheduler, warmup_steps_for
from minift.sampling import SequentialSampler

from conftest import REPO, SHARED, shared_path

CPU = torch.device("cpu")


def _loader(examples, collator):
    return lambda sampler: [collator([examples[i] for i in batch]) for batch in sampler]


def _trace():
    with open(shared_path("fixtures", "trainer_trace", "trace.json")) as f:
        trace = json.load(f)
    with open(shared_path("fixtures", "trainer_trace", "batches.json")) as f:
        examples = [{"input_ids": e["input_ids"]} for e in json.load(f)["examples"]]
    return trace, examples


def _check_final_params(state_dict, trace):
    final = load_file(str(shared_path("fixtures", "trainer_trace", "final_params_partial.safetensors")))
    for key, value in final.items():
        if key.endswith(".row_ids"):
            continue
        if key.endswith(".rows"):
            rows = final["transformer.tokens_embed.weight.row_ids"]
            mine = state_dict["transformer.tokens_embed.weight"][rows]
        else:
            mine = state_dict[key]
        torch.testing.assert_close(mine, value, rtol=0, atol=1e-5, msg=key)
    for key, stats in trace["final_params"]["per_tensor"].items():
        if key == "lm_head.weight":
            continue
        p = state_dict[key].double()
        assert p.sum().item() == pytest.approx(stats["sum"], rel=1e-5, abs=1e-4), key
        assert p.abs().sum().item() == pytest.approx(stats["sum_abs"], rel=1e-5), key


@pytest.mark.shared
@pytest.mark.parametrize("denominator", ["n_label_tokens", "n_loss_targets"])
def test_reproduces_the_trainer_trace(denominator):
    trace, examples = _trace()
    model = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt"), resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0)
    assert decay_parameter_names(model) == trace["optimizer_param_groups"][0]["params"]
    optimizer = make_adamw(model, lr=1e-3, weight_decay=0.01, fused="yes")
    scheduler = make_scheduler(optimizer, "linear", total_steps=8, warmup_steps=2)
    records = []
    train(model, optimizer, scheduler, SequentialSampler(64, 4), _loader(examples, Collator(pad_id=40478)),
          total_steps=8, grad_accum=2, device=CPU, count_key=denominator, log=records.append)
    for mine, theirs in zip(records, trace["steps"], strict=True):
        assert mine["lr"] == pytest.approx(theirs["learning_rate"], rel=1e-9, abs=1e-15)
        targets = sum(theirs["microbatch_target_counts"])
        # dividing by the targets instead of Trainer's N scales the whole gradient by N / targets
        scale = 1.0 if denominator == "n_label_tokens" else theirs["num_items_in_batch"] / targets
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"] * scale, rel=1e-4)
        assert mine["loss_tokens"] == (theirs["num_items_in_batch"] if denominator == "n_label_tokens" else targets)
        if denominator == "n_label_tokens":  # Trainer's logged column
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        else:  # minift's default: the mean CE per target
            assert mine["loss"] == pytest.approx(theirs["loss"] * theirs["num_items_in_batch"] / targets, abs=1e-4)
    _check_final_params(model.state_dict(), trace)


@pytest.mark.shared
def test_trainer_trace_config_end_to_end(tmp_path):
    trace, _ = _trace()
    cfg = load_config(REPO / "configs" / "trainer-trace.toml", [
        f'model.name="{SHARED / "fixtures" / "tiny-openai-gpt"}"',
        f'data.source="{SHARED / "data" / "tweet_sentiment_extraction"}"',
        f'train.output_dir="{tmp_path}"', "train.progress=false", "train.plot=false", "eval.max_examples=32"])
    summary = run(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    assert [r["loss"] for r in steps] == pytest.approx([s["loss"] for s in trace["steps"]], abs=1e-4)
    final = minift.from_pretrained(tmp_path / "checkpoint-8")
    _check_final_params(final.state_dict(), trace)
    assert summary["eval_after"]["n_scored"] == 32


def _uneven_examples(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab - 1, (int(torch.randint(2, 14, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_accumulation_equals_one_big_batch(dtype, atol):
    examples = _uneven_examples(24, 50)
    finals = []
    for batch_size, accum in ((2, 3), (6, 1), (1, 6)):
        torch.manual_seed(0)
        model = build_model(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(dtype)
        optimizer = make_adamw(model, lr=1e-2, weight_decay=0.1, fused="no")
        scheduler = make_scheduler(optimizer, "linear", total_steps=4, warmup_steps=1)
        records = []
        train(model, optimizer, scheduler, SequentialSampler(24, batch_size), _loader(examples, Collator(pad_id=49)),
              total_steps=4, grad_accum=accum, device=CPU, max_grad_norm=0.5, log=records.append)
        finals.append((model.state_dict(), records))
    (big, big_log) = finals[1]
    for small, small_log in (finals[0], finals[2]):
        for key in big:
            torch.testing.assert_close(small[key], big[key], rtol=0, atol=atol)
        assert [r["loss"] for r in small_log] == pytest.approx([r["loss"] for r in big_log], abs=atol)
        assert [r["grad_norm"] for r in small_log] == pytest.approx([r["grad_norm"] for r in big_log], rel=1e-5)


def _tiny_training(precision, steps=6, lr=1e-2, model=None):
    examples = _uneven_examples(32, 60, seed=1)
    torch.manual_seed(0)
    model = model or build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_adamw(model, lr=lr)
    scheduler = make_scheduler(optimizer, "constant", steps)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    records = []
    state = train(model, optimizer, scheduler, SequentialSampler(32, 4), _loader(examples, Collator(pad_id=59)),
                  total_steps=steps, grad_accum=2, device=CPU, precision=precision, scaler=scaler,
                  log=records.append)
    return model, before, records, state


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_smoke(precision):
    model, before, records, state = _tiny_training(precision)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.transformer.wte.weight.dtype == torch.float32  # master weights stay fp32
    assert state.skipped_overflow == sum(r["overflow"] for r in records)


def test_bf16_warns_on_a_cpu_without_native_bf16(monkeypatch):
    from minift import optim

    monkeypatch.setattr(optim, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on this CPU has no native support"):
        optim.warn_slow_bf16(CPU)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped():
    model = build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="loss is nan at optimizer step 1"):
        _tiny_training("fp32", model=model)


def test_nonfinite_skip_counts_and_leaves_weights():
    examples = _uneven_examples(16, 60)
    model = build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_adamw(model, lr=1e-2)
    state = train(model, optimizer, make_scheduler(optimizer, "constant", 2), SequentialSampler(16, 4),
                  _loader(examples, Collator(pad_id=59)), total_steps=2, grad_accum=2, device=CPU,
                  on_nonfinite="skip")
    assert state.skipped_nonfinite == 2 and state.step == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_schedules_match_transformers_formulas():
    total, warmup = 10, 3
    linear = lr_lambda("linear", warmup, total)
    cosine = lr_lambda("cosine", warmup, total)
    constant = lr_lambda("constant", warmup, total)
    assert [linear(k) for k in range(4)] == [0, 1 / 3, 2 / 3, 1.0]
    assert linear(7) == pytest.approx(3 / 7) and linear(10) == 0.0
    assert cosine(3) == 1.0 and cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert constant(1) == pytest.approx(1 / 3) and constant(9) == 1.0
    assert warmup_steps_for(1000, 0, 0.05) == 50 and warmup_steps_for(1000, 7, 0.05) == 7


def test_decay_groups_gpt2_tied_head_counted_once():
    model = build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    decay = decay_parameter_names(model)
    assert decay == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                     "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
                     "transformer.h.0.mlp.c_proj.weight"]
    optimizer = make_adamw(model, 1e-3, weight_decay=0.1)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len(list(model.parameters()))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
