"""Activation checkpointing per block (CausalLM.set_activation_checkpointing): the same loss and
gradients as the plain forward (dropout included), fewer tensors kept for backward, and it
composes with LoRA and torch.compile."""
from __future__ import annotations

import pytest
import torch

import minift
from minift.lora import LoraSettings, apply_lora, trainable_parameters

DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


def _model(model_type: str, dtype=torch.float64):
    torch.manual_seed(0)
    if model_type == "gpt2":
        config = minift.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=96, n_positions=32, **DROPOUT)
    else:
        config = minift.GPTConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=96, n_positions=32, **DROPOUT)
    return minift.build_model(config).to(dtype).train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _loss_and_grads(model, params=None):
    ids, mask, labels = _batch()
    model.zero_grad()
    torch.manual_seed(5)  # dropout
    out = model(ids, attention_mask=mask, labels=labels, right_padded=True)  # the collator's hint
    loss = out.loss_sum / out.n_loss_targets
    loss.backward()
    params = params if params is not None else dict(model.named_parameters())
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


def _assert_same(first, second, atol):
    torch.testing.assert_close(second[0], first[0], rtol=0, atol=atol)
    assert first[1].keys() == second[1].keys()
    for name, grad in first[1].items():
        torch.testing.assert_close(second[1][name], grad, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("model_type", ["gpt2", "openai-gpt"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_same_loss_and_gradients_with_dropout(model_type, dtype, atol):
    """Dropout on everywhere: the recomputation restores the RNG state, so it draws the same masks."""
    model = _model(model_type, dtype)
    assert not model.activation_checkpointing
    plain = _loss_and_grads(model)
    checkpointed = _loss_and_grads(model.set_activation_checkpointing(True))
    assert model.activation_checkpointing
    _assert_same(plain, checkpointed, atol)
    again = _loss_and_grads(model.set_activation_checkpointing(False))
    _assert_same(plain, again, 0.0)


def test_fewer_tensors_are_kept_for_backward():
    """What autograd keeps between forward and backward, counted outside the checkpointed blocks
    (the blocks' inner tensors are recomputed, not kept): less than half with checkpointing."""
    def kept_bytes(model):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        ids, mask, labels = _batch()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, attention_mask=mask, labels=labels)
        out.loss_sum.backward()
        return total

    model = _model("gpt2", torch.float32).set_hot_path(fused_head=True)
    plain = kept_bytes(model)
    checkpointed = kept_bytes(model.set_activation_checkpointing(True))
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_composes_with_lora():
    settings = LoraSettings(r=4, dropout=0.1, target_modules=["c_attn", "c_fc"], bias="lora_only")
    model = apply_lora(_model("gpt2"), settings, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a non-zero B, so every adapter parameter gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    params = trainable_parameters(model)
    plain = _loss_and_grads(model, params)
    checkpointed = _loss_and_grads(model.set_activation_checkpointing(True), params)
    _assert_same(plain, checkpointed, 1e-12)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)


def test_generation_is_unaffected():
    model = _model("gpt2", torch.float32)
    expected = model.generate([1, 2, 3], max_new_tokens=6, temperature=0)
    model.set_activation_checkpointing(True)
    assert model.generate([1, 2, 3], max_new_tokens=6, temperature=0) == expected
    assert model.generate([1, 2, 3], max_new_tokens=6, temperature=0, use_cache=False) == expected


@pytest.mark.slow
def test_composes_with_compile_in_one_graph():
    """torch.compile (aot_eager backend) of a checkpointed, adapted model: no graph break, the eager
    loss and gradients (float32, dropout on)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = _model("gpt2", torch.float32).set_hot_path(loss_rows="all", fused_head=True)
    apply_lora(model, LoraSettings(r=4, target_modules=["c_attn", "c_proj"]),
               generator=torch.Generator().manual_seed(0))
    model.set_activation_checkpointing(True)
    params = trainable_parameters(model)
    eager = _loss_and_grads(model, params)
    counters.clear()
    compiled = _loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True), params)
    assert sum(counters["graph_break"].values()) == 0
    _assert_same(eager, compiled, 1e-6)


@pytest.mark.slow
def test_the_memory_benchmark_counts_what_each_setting_keeps(tmp_path):
    """benchmarks/memory.py on a small shape: exact counts that follow from the settings (AdamW's two
    moments per trained weight, no gradient for a frozen one, fewer saved tensors with checkpointing,
    half of each on each of FSDP's 2 ranks)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--n-layer", "3",
                    "--n-embd", "64", "--batch", "2", "--seq", "32", "--steps", "1", "--json", str(out)],
                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True, timeout=600)
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    full, lora = rows["full"], rows["lora"]
    assert full["grads"] == full["params"] and full["n_trained"] == full["n_params"]
    # exp_avg and exp_avg_sq (and step counters)
    assert 2 * full["params"] <= full["adam"] < 2 * full["params"] + 4096
    # r = 8 on each layer's c_attn (64 -> 192), attn.c_proj (64 -> 64), c_fc (64 -> 256),
    # mlp.c_proj (256 -> 64)
    assert lora["n_trained"] == 3 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert lora["grads"] == 4 * lora["n_trained"]
    assert full["tensor_peak"] >= full["params"] + full["grads"] + full["adam"]
    # under full fine-tuning the fused head keeps its weight's gradient [50,304 x 64] from the forward
    head_gradient = {"full": 50304 * 64 * 4, "lora": 0}
    for row, head in head_gradient.items():
        assert rows[row + "+ac"]["kept"] - head < 0.2 * (rows[row]["kept"] - head), row
    # FSDP over 2 ranks: each holds half of every weight, gradient and moment (every dim 0 here is even)
    fsdp = rows["fsdp"]
    assert fsdp["ranks"] == 2 and fsdp["n_params"] == full["n_params"]
    assert (fsdp["params"], fsdp["grads"]) == (full["params"] // 2, full["grads"] // 2)
    assert fsdp["adam"] - full["adam"] // 2 < 4096
