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
from minift.loop import Hooks, NextTokenLoss, NonFiniteLoss, skip_nonfinite, train
from minift.models import GPT2Config, GPTConfig, build_model
from minift.optim import decay_parameter_names, lr_lambda, make_adamw, make_scheduler, warmup_steps_for
from minift.precision import Precision
from minift.sampling import SequentialSampler

from conftest import REPO, SHARED, shared_path

CPU = torch.device("cpu")


def _loader(examples, sampler, collator):
    return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collator)


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
    model = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt"), resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0)
    assert decay_parameter_names(model) == trace["optimizer_param_groups"][0]["params"]
    optimizer = make_adamw(model, lr=1e-3, weight_decay=0.01, fused="yes")
    scheduler = make_scheduler(optimizer, "linear", total_steps=8, warmup_steps=2)
    records = []
    train(model, optimizer, scheduler, _loader(examples, SequentialSampler(64, 4), Collator(pad_id=40478)),
          total_steps=8, grad_accum=2, loss=NextTokenLoss(denominator), hooks=Hooks(log=records.append))
    for mine, theirs in zip(records, trace["steps"], strict=True):
        assert mine["lr"] == pytest.approx(theirs["learning_rate"], rel=1e-9, abs=1e-15)
        targets = sum(theirs["microbatch_target_counts"])
        # dividing by the targets instead of Trainer's N scales the whole gradient by N / targets
        scale = 1.0 if denominator == "n_label_tokens" else theirs["num_items_in_batch"] / targets
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"] * scale, rel=1e-4)
        assert mine["loss_tokens"] == (theirs["num_items_in_batch"] if denominator == "n_label_tokens"
                                       else targets)
        if denominator == "n_label_tokens":  # Trainer's logged column
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        else:  # minift's default: the mean CE per target
            assert mine["loss"] == pytest.approx(theirs["loss"] * theirs["num_items_in_batch"] / targets,
                                                 abs=1e-4)
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
        train(model, optimizer, scheduler,
              _loader(examples, SequentialSampler(24, batch_size), Collator(pad_id=49)),
              total_steps=4, grad_accum=accum, max_grad_norm=0.5, hooks=Hooks(log=records.append))
        finals.append((model.state_dict(), records))
    (big, big_log) = finals[1]
    for small, small_log in (finals[0], finals[2]):
        for key in big:
            torch.testing.assert_close(small[key], big[key], rtol=0, atol=atol)
        assert [r["loss"] for r in small_log] == pytest.approx([r["loss"] for r in big_log], abs=atol)
        assert [r["grad_norm"] for r in small_log] == pytest.approx([r["grad_norm"] for r in big_log],
                                                                    rel=1e-5)


def _tiny_training(precision, steps=6, lr=1e-2, model=None):
    examples = _uneven_examples(32, 60, seed=1)
    torch.manual_seed(0)
    model = model or build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_adamw(model, lr=lr)
    scheduler = make_scheduler(optimizer, "constant", steps)
    records = []
    state = train(model, optimizer, scheduler,
                  _loader(examples, SequentialSampler(32, 4), Collator(pad_id=59)),
                  total_steps=steps, grad_accum=2, precision=Precision(precision, CPU),
                  hooks=Hooks(log=records.append))
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
    from minift import precision

    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on this CPU has no native support"):
        Precision("bf16", CPU).warn_if_slow()


def test_precision_object_owns_autocast_and_scaler():
    # fp16 cannot run without loss scaling: the scaler comes with the precision
    assert Precision("fp16", CPU).scaler.is_enabled()
    assert not Precision("bf16", CPU).scaler.is_enabled() and not Precision("fp32", CPU).scaler.is_enabled()
    with Precision("bf16", CPU).autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with Precision("fp32", CPU).autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Precision("fp8", CPU)


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
    state = train(model, optimizer, make_scheduler(optimizer, "constant", 2),
                  _loader(examples, SequentialSampler(16, 4), Collator(pad_id=59)), total_steps=2,
                  grad_accum=2, hooks=Hooks(on_nonfinite=skip_nonfinite))
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


def test_train_takes_a_plain_dataloader_of_labelled_batches():
    """``minift.train`` with batches from an ordinary DataLoader (no minift sampler, no counts) gives
    the same weights as minift's sampler + collator over the same order."""
    examples = _uneven_examples(16, 60)
    collate = Collator(pad_id=59)
    finals = []
    for loader in (_loader(examples, SequentialSampler(16, 4), collate),
                   torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=lambda b: {
                       k: v for k, v in collate(b).items()
                       if k in ("input_ids", "attention_mask", "labels")})):
        torch.manual_seed(0)
        model = build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        optimizer = make_adamw(model, lr=1e-2)
        minift.train(model, optimizer, make_scheduler(optimizer, "constant", 3), loader, total_steps=3,
                     grad_accum=2)
        finals.append(model.state_dict())
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=0, atol=1e-6)


def test_the_loop_reads_its_epoch_batch_list_once_per_epoch():
    sampler = SequentialSampler(20, 4)
    calls = []
    original = sampler.global_batches
    sampler.global_batches = lambda epoch: calls.append(epoch) or original(epoch)
    for _ in range(10):
        len(sampler)
    assert calls == [0]
    sampler.set_epoch(1)
    len(sampler), len(sampler)
    assert calls == [0, 1]


@pytest.mark.filterwarnings("error")  # a skipped first step is no misordered schedule: no warning for users
@pytest.mark.parametrize("fused", ["yes", "no"])
def test_nonfinite_step_is_skipped_with_either_optimizer(fused):
    """Fused AdamW drops a NaN step on the device (found_inf, no host sync); the for-loop one checks
    on the host. Either way the weights are untouched and the step is counted."""
    examples = _uneven_examples(16, 60)
    model = build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_adamw(model, lr=1e-2, weight_decay=0.1, fused=fused)
    state = train(model, optimizer, make_scheduler(optimizer, "constant", 3),
                  _loader(examples, SequentialSampler(16, 4), Collator(pad_id=59)), total_steps=3,
                  grad_accum=1, hooks=Hooks(on_nonfinite=skip_nonfinite, log_every=2))
    assert state.skipped_nonfinite == 3 and state.step == 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) or torch.isnan(before[key]).any(), key
    if fused == "yes":
        assert all(int(s["step"]) == 0 for s in optimizer.state.values())  # AdamW's step count restored too


def test_steps_that_do_not_log_read_nothing_back_from_the_device(monkeypatch):
    """A CPU proxy for CUDA's sync debug mode: every tensor -> Python conversion made by the loop (and
    the step's helpers: optimizer step, step records, prefetch, DDP counts) is counted. With
    log_every = L the loop reads the device once per L steps, not once per step."""
    import os
    import sys

    step_files = tuple(os.path.join("minift", f) for f in ("loop.py", "optim.py", "metrics.py", "runtime.py",
                                                            "distributed.py"))
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(step_files):
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    reads = {}
    for steps in (4, 8):
        calls.clear()
        examples = _uneven_examples(64, 60)
        model = build_model(GPT2Config(vocab_size=60, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        optimizer = make_adamw(model, lr=1e-2, fused="yes")
        records = []
        train(model, optimizer, make_scheduler(optimizer, "constant", steps),
              _loader(examples, SequentialSampler(64, 4), Collator(pad_id=59)), total_steps=steps,
              grad_accum=2, hooks=Hooks(log=records.append, log_every=4))
        assert [r["step"] for r in records] == list(range(1, steps + 1))  # every step is still logged
        reads[steps] = list(calls)
    assert reads == {4: ["tolist"], 8: ["tolist", "tolist"]}
