"""The three LM-loss paths (minift/models/lm_loss.py) against each other and against plain
logits + cross-entropy, in float64: loss and every gradient, with a padded vocabulary."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minift.models.lm_loss import (
    IGNORE_INDEX,
    LinearCrossEntropy,
    fused_lm_loss_sum,
    lm_loss_sum,
    lm_loss_sum_all_positions,
)

VOCAB, PADDED, WIDTH = 75, 128, 12


def _case(seed=0, batch=3, time=10):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time, WIDTH, dtype=torch.float64, generator=g)
    weight = torch.randn(PADDED, WIDTH, dtype=torch.float64, generator=g)
    # loud padding rows
    weight[VOCAB:] = torch.randn(PADDED - VOCAB, WIDTH, dtype=torch.float64, generator=g) * 5
    labels = torch.randint(0, VOCAB, (batch, time), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # pads
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    """Plain: logits of the real vocabulary only, cross-entropy with ignore_index."""
    logits = hidden[:, :-1] @ weight[:VOCAB].T
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _loss_and_grads(fn, hidden, weight, labels):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(hidden, weight, labels)
    loss = out.loss_sum if hasattr(out, "loss_sum") else out
    (2.5 * loss).backward()  # a non-unit incoming gradient
    return loss.detach(), hidden.grad, weight.grad, out


PATHS = {
    "labelled": lambda h, w, y: lm_loss_sum(h, w, y, chunk_rows=7, vocab_size=VOCAB),
    "all": lambda h, w, y: lm_loss_sum_all_positions(h, w, y, vocab_size=VOCAB),
    "fused-all": lambda h, w, y: fused_lm_loss_sum(h, w, y, rows="all", vocab_size=VOCAB, chunk_rows=4),
    "fused-labelled": lambda h, w, y: fused_lm_loss_sum(h, w, y, rows="labelled", vocab_size=VOCAB,
                                                        chunk_rows=5),
    "fused-one-chunk": lambda h, w, y: fused_lm_loss_sum(h, w, y, rows="all", vocab_size=VOCAB,
                                                         chunk_rows=10_000),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_path_equals_plain_cross_entropy_float64(path):
    hidden, weight, labels = _case()
    want_loss, want_dh, want_dw, _ = _loss_and_grads(_reference, hidden, weight, labels)
    loss, dh, dw, out = _loss_and_grads(PATHS[path], hidden, weight, labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dh, want_dh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw[:VOCAB], want_dw[:VOCAB], rtol=1e-10, atol=1e-12)
    assert not dw[VOCAB:].any()  # the padding rows take no probability mass
    assert int(out.n_loss_targets) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_fused_under_no_grad_computes_the_loss_only():
    hidden, weight, labels = _case(seed=1)
    with torch.no_grad():
        out = fused_lm_loss_sum(hidden, weight, labels, vocab_size=VOCAB, chunk_rows=4)
    torch.testing.assert_close(out.loss_sum, _reference(hidden, weight, labels), rtol=1e-12, atol=1e-12)
    assert out.loss_sum.grad_fn is None


def test_fused_under_bf16_autocast_is_close_to_the_autocast_plain_path():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t
                              for t in _case(seed=2, batch=4, time=32))
    results = []
    for fn in (PATHS["all"], PATHS["fused-all"]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(fn, hidden, weight, labels))
    (plain_loss, plain_dh, plain_dw, _), (loss, dh, dw, _) = results
    assert loss.dtype == torch.float32 and dw.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, rtol=2e-3, atol=0)
    torch.testing.assert_close(dh, plain_dh, rtol=0, atol=0.05 * plain_dh.abs().max().item())
    torch.testing.assert_close(dw, plain_dw, rtol=0, atol=0.05 * plain_dw.abs().max().item())


def test_fused_keeps_no_logits_for_backward():
    """What autograd holds between forward and backward: the plain path keeps [rows x vocab]
    logits, the fused one only d x and d W."""
    hidden, weight, labels = _case(seed=3, batch=8, time=64)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    for fn, holds_logits in ((PATHS["all"], True), (PATHS["fused-all"], False)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.shape) or t,
                                                      lambda t: t):
            fn(hidden, weight, labels)
        assert any(len(s) == 2 and s[-1] == PADDED for s in saved) == holds_logits, saved


def test_fused_function_with_everything_ignored_gives_zero_loss_and_gradients():
    hidden, weight, _ = _case()
    targets = torch.full((5,), IGNORE_INDEX)
    x = hidden[0, :5].clone().requires_grad_()
    loss = LinearCrossEntropy.apply(x, weight, targets, VOCAB, 2, torch.float64, True)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
