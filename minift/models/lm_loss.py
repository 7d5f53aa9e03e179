"""The language-model loss: which positions go through the LM head, and how the head's
logits meet the cross-entropy.

Three ways, every one the same summed next-token CE (tests/test_lm_loss.py, float64):

``lm_loss_sum``               only positions with a label, gathered, then chunks of plain
                              linear + CE (autograd keeps every chunk's logits for backward)
``lm_loss_sum_all_positions`` logits at every position, CE with ignore_index (transformers' way)
``fused_lm_loss_sum``         ``LinearCrossEntropy``: chunk by chunk, logits -> loss and the
                              gradients at once; only [rows x width] and [vocab x width]
                              gradients are kept, never [rows x vocab] logits

The head weight may have more rows than the vocabulary (``CausalLM.pad_vocab``: GEMM-friendly
widths); the columns past ``vocab_size`` are set to -inf before the softmax, so they take no
probability mass and get no gradient.

``rows="all"`` (every position, ignored targets masked) keeps every tensor's shape fixed by
the batch's shape and never reads a device value on the host: what torch.compile and CUDA
graphs need. Its ``n_loss_targets`` is then a 0-d tensor (read it only when needed).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_ROWS = ("labelled", "all")  # which positions reach the LM head


class LossOutput(NamedTuple):
    """Summed next-token cross-entropy and the number of targets it sums over.

    The loop divides by the total ``n_loss_targets`` of the whole accumulation window (the
    collator's count), so K micro-batches equal one big batch whatever their lengths.
    ``n_loss_targets`` is an int, or a 0-d tensor on the sync-free ``rows="all"`` paths."""

    loss_sum: torch.Tensor
    n_loss_targets: int | torch.Tensor


def loss_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 under bf16/fp16, fp64 kept: the softmax never runs in half precision."""
    return torch.promote_types(dtype, torch.float32)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Columns past ``vocab_size`` (padding rows of the head) to -inf, in place on a fresh tensor."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = float("-inf")
    return logits


def shifted_rows(hidden: torch.Tensor, labels: torch.Tensor, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states [N, C] that predict a label and their targets [N] (the label shift).
    ``"labelled"``: only positions whose target is not -100 (N depends on the data: one host
    sync); ``"all"``: every position but the last, ignored targets left as -100 (N = B (T-1))."""
    targets = labels[:, 1:]
    if rows == "labelled":
        keep = targets != IGNORE_INDEX
        return hidden[:, :-1][keep], targets[keep]
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def lm_loss_sum(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 8192,
                vocab_size: int | None = None) -> LossOutput:
    """Next-token CE summed over positions whose shifted label is not -100.

    Only those rows go through the LM head: pads, the last position and ignored prompt
    tokens never produce logits, and the rows are processed ``chunk_rows`` at a time so
    the [tokens x vocab] logits are never materialized in one piece.
    """
    rows, target_ids = shifted_rows(hidden, labels, "labelled")
    n_targets = int(target_ids.shape[0])
    loss_dtype = loss_dtype_for(hidden.dtype)
    loss_sum = hidden.new_zeros((), dtype=loss_dtype)
    for start in range(0, n_targets, chunk_rows):
        logits = mask_padded_vocab(F.linear(rows[start:start + chunk_rows], head_weight).to(loss_dtype),
                                   vocab_size)
        loss_sum = loss_sum + F.cross_entropy(logits, target_ids[start:start + chunk_rows], reduction="sum")
    if n_targets == 0:
        # keep the graph connected so backward() works on a batch with nothing to predict
        loss_sum = loss_sum + 0.0 * hidden.sum()
    return LossOutput(loss_sum, n_targets)


def lm_loss_sum_all_positions(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                              vocab_size: int | None = None) -> LossOutput:
    """The plain path ``lm_loss_sum`` is measured against: logits [B, T, vocab] at every position
    (pads and the last one included), then cross-entropy with ``ignore_index``, as transformers does."""
    rows, targets = shifted_rows(hidden, labels, "all")
    logits = mask_padded_vocab(F.linear(rows, head_weight).to(loss_dtype_for(hidden.dtype)), vocab_size)
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return LossOutput(loss_sum, (targets != IGNORE_INDEX).sum())


def fused_lm_loss_sum(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                      rows: str = "all", vocab_size: int | None = None, chunk_rows: int = 1024) -> LossOutput:
    """``LinearCrossEntropy`` over the rows ``rows`` selects (see ``shifted_rows``). The head
    runs in the autocast dtype when autocast is on (as ``F.linear`` would), the softmax in fp32.
    ``chunk_rows``: 1024 rows of a 40k vocabulary are 166 MB of fp32 logits at a time."""
    x, targets = shifted_rows(hidden, labels, rows)
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else head_weight.dtype)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or head_weight.requires_grad)
    loss_sum = LinearCrossEntropy.apply(x, head_weight, targets, vocab_size or head_weight.shape[0],
                                        chunk_rows, compute_dtype, needs_grad)
    count = int(targets.shape[0]) if rows == "labelled" else (targets != IGNORE_INDEX).sum()
    return LossOutput(loss_sum, count)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(x_i W^T, t_i) over rows with t_i != -100, never holding [rows x vocab] logits.

    Forward goes ``chunk_rows`` rows at a time: logits (compute dtype) -> fp32 -> -inf on the
    padded vocabulary -> log-sum-exp -> loss; when a gradient is wanted, the same chunk's
    d loss / d logits = softmax - onehot gives the chunk's d x and adds to d W right away (three
    GEMMs per chunk, as the plain path's forward + backward; no recomputation). Backward only
    scales the stored gradients by the incoming one. Memory: d x [N, C] and d W [V, C] (fp32)
    instead of the N x V logits (and their softmax) that autograd keeps on the plain path."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk_rows: int, compute_dtype: torch.dtype,
                needs_grad: bool):
        loss_dtype = loss_dtype_for(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(compute_dtype)
            loss_sum = torch.zeros((), dtype=loss_dtype, device=x.device)
            grad_x = torch.empty_like(x) if needs_grad else None
            # a frozen head (LoRA) needs no [vocab x width] gradient: one GEMM per chunk less
            weight_grad = needs_grad and weight.requires_grad
            grad_w = torch.zeros(weight.shape, dtype=loss_dtype,
                                 device=weight.device) if weight_grad else None
            for start in range(0, x.shape[0], chunk_rows):
                xc = x[start:start + chunk_rows].to(compute_dtype)
                tc = targets[start:start + chunk_rows]
                valid = tc != IGNORE_INDEX
                safe_t = torch.where(valid, tc, 0)[:, None]
                logits = mask_padded_vocab((xc @ w.T).to(loss_dtype), vocab_size)
                lse = torch.logsumexp(logits, dim=-1)
                loss_sum = loss_sum + torch.where(valid, lse - logits.gather(1, safe_t)[:, 0], 0).sum()
                if needs_grad:
                    # d CE / d logits = softmax - onehot(target), zero on ignored rows; in place on logits
                    grad_logits = logits.sub_(lse[:, None]).exp_()
                    grad_logits.scatter_add_(1, safe_t, torch.full_like(lse, -1.0)[:, None])
                    grad_logits.mul_(valid[:, None])
                    grad_logits = grad_logits.to(compute_dtype)
                    grad_x[start:start + chunk_rows] = (grad_logits @ w).to(x.dtype)
                    if weight_grad:
                        grad_w += grad_logits.T @ xc
        if needs_grad:
            ctx.weight_grad = weight_grad
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if weight_grad else None)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_w = grad_w * grad_loss.to(grad_w.dtype) if ctx.weight_grad else None
        return grad_x * grad_loss.to(grad_x.dtype), grad_w, None, None, None, None, None


def label_smoothed_sums(logits: torch.Tensor, labels: torch.Tensor, epsilon: float
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Label-smoothed next-token loss as sums over the positions whose shifted label is not -100:
    ``(1 - epsilon) * sum(-log p[target]) + epsilon * sum(mean over the vocabulary of -log p)``,
    the plain summed CE, and the number of those positions. ``logits`` [B, T, V] cover the true
    vocabulary only (``CausalLM.forward`` without labels), so V is the mean's width. Divided by a
    count, this is transformers' ``LabelSmoother`` with ``shift_labels=True``."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1][keep].to(loss_dtype_for(logits.dtype)), dim=-1)
    nll_sum = -log_probs.gather(1, targets[keep][:, None]).sum()
    uniform_sum = -log_probs.sum() / log_probs.shape[-1]
    return (1 - epsilon) * nll_sum + epsilon * uniform_sum, nll_sum, int(keep.sum())
