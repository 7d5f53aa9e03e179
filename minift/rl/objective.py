"""The policy update of GRPO and RLOO: the loss objects ``loop.train`` calls, as TRL 1.16 computes them.

    one forward of prompt ‖ completion              (CompletionLogProbs: log π(token) at T, entropy)
    ratio = π / π_old per token (GRPO) or per sequence (GRPO "sequence": exp of the mean log-ratio;
            RLOO: exp of the summed log-ratio); π_old = the weights that sampled the round
    loss  = -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A)      (+ β · k3 KL, GRPO)
    -> aggregated per micro-batch exactly as TRL does, per ``loss_type``

The micro-batch (``batching.round_batch`` then ``shuffled_split``, plus per round): ``input_ids``,
``attention_mask``, ``position_ids`` [B, P + C], ``completion_mask`` [B, C], ``advantages`` [B],
optionally ``old_logps`` / ``ref_logps`` [B, C] (per-token log-probs under the sampling weights /
the frozen reference, from ``completion_logps``), and for "dapo" ``tokens_per_micro_batch``.

How K micro-batches reproduce TRL. TRL normalises every micro-batch's loss on its own and divides
by the number of micro-batches in the step (``current_gradient_accumulation_steps``); the loop divides
the summed ``loss_sum`` by the summed ``count``. So ``count`` is 1 per micro-batch and ``loss_sum``
is TRL's per-micro-batch loss before that division:

    grpo     mean over the micro-batch's sequences of (Σ_t loss·m / max(Σ_t m, 1))
    bnpo     Σ loss·m / max(Σ m, 1) over the micro-batch's tokens (its own count: a micro-batch with
             few tokens weighs as much as one with many; under DDP each rank's own tokens)
    dr_grpo  Σ loss·m / (B · max_completion_length)
    dapo     Σ loss·m / (the round's loss tokens over all ranks / (ranks × steps_per_generation)):
             the mean tokens per micro-batch of the round, a denominator shared by every micro-batch
             of the round, so a step of all the round's micro-batches is the round's token mean
    RLOO     mean over the micro-batch's sequences of the sequence loss

None of grpo / bnpo / dapo is Σ over tokens / Σ of token counts of the step (that is the plain
SFT loss): each divides by something per micro-batch, which ``count`` = 1 carries exactly. Under
DDP the loop divides by (ranks × K) / ranks = K and DDP averages the ranks, as TRL.

Metrics are per micro-batch too: TRL logs the mean over the step's micro-batches of each
micro-batch's token mean (``kl``, ``entropy``, ``clip_ratio/*_mean``, over all ranks' tokens),
so each is a ``metric_sums`` entry holding that micro-batch value (the loop divides by K).
``clip_ratio/low_min`` and ``/high_max`` are a min / max over sequences and NaN for a micro-batch
with no completion token, which TRL leaves out of the step's mean: they come with a helper count
(``_n/<name>``), and ``finish_step_metrics`` turns the pair back into TRL's value.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import SINGLE_PROCESS, Distributed
from ..lora import adapters_disabled

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
COUNT_PREFIX = "_n/"  # a helper metric: how many micro-batches had a value (see finish_step_metrics)


class RLLoss(NamedTuple):
    loss_sum: torch.Tensor  # TRL's loss of this micro-batch, before the division by the step's micro-batches
    metric_sums: dict[str, torch.Tensor]


class CompletionLogProbs(nn.Module):
    """Wraps a ``CausalLM``: forward returns, for the last ``n_completion`` tokens of each row, the
    log-probability of that token under softmax(logits / temperature) and that distribution's
    entropy, both [B, C]. Only those C positions go through the LM head. A module of its own so DDP
    can wrap the forward that runs."""

    def __init__(self, lm: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.lm, self.temperature = lm, temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                n_completion: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.hidden_states(input_ids, attention_mask, position_ids)
        before = hidden[:, -n_completion - 1:-1]  # the position before each completion token predicts it
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logits = F.linear(before, self.lm.lm_head_weight).to(dtype) / self.temperature
        logp_all = logits.log_softmax(-1)
        logps = logp_all.gather(-1, input_ids[:, -n_completion:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logps, entropy


class AdapterOffLogProbs(CompletionLogProbs):
    """The reference of a LoRA policy: the policy itself with its adapter off, in eval mode for the
    forward (what a frozen copy of the initial policy computes while ``lora.bias = "none"``), so no
    second model is held. TRL's GRPOTrainer does the same with peft's ``disable_adapter``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                n_completion: int) -> tuple[torch.Tensor, torch.Tensor]:
        training = self.lm.training
        self.lm.eval()
        try:
            with adapters_disabled(self.lm):
                return super().forward(input_ids, attention_mask, position_ids, n_completion)
        finally:
            self.lm.train(training)


def model_inputs(batch: dict, device: torch.device) -> dict:
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}
    inputs["n_completion"] = batch["completion_mask"].shape[1]
    return inputs


def completion_forward(model: nn.Module, batch: dict, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward of both objectives: the policy's per-token log-probs and entropies of the
    micro-batch's completions, each 0 where the completion mask is 0, and that mask (as their dtype)."""
    logps, entropy = model(**model_inputs(batch, device))
    mask = batch["completion_mask"].to(device=device, dtype=logps.dtype)
    return masked(logps, mask), masked(entropy, mask), mask


@torch.no_grad()
def completion_logps(scorer: CompletionLogProbs, batch: dict, rows_per_forward: int, device: torch.device,
                     autocast=None) -> torch.Tensor:
    """[N, C] per-token log-probs of a whole round under ``scorer``'s current weights (old or reference
    log-probs), ``rows_per_forward`` rows at a time (TRL: the per-device batch size), float32, 0 where
    the completion mask is 0 (TRL's value there). ``autocast``: a reusable autocast context (e.g.
    ``torch.autocast("cuda", torch.bfloat16)``), the training forward's, or None for none."""
    inputs = model_inputs(batch, device)
    n_completion = inputs.pop("n_completion")
    out = []
    for start in range(0, inputs["input_ids"].shape[0], rows_per_forward):
        rows = {k: v[start:start + rows_per_forward] for k, v in inputs.items()}
        with autocast or contextlib.nullcontext():
            out.append(scorer(**rows, n_completion=n_completion)[0].float())
    logps = torch.cat(out)
    return logps.masked_fill(batch["completion_mask"].to(device) == 0, 0.0)


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where the mask is 1 and exactly 0 elsewhere (TRL's fused head returns 0 there)."""
    return values.masked_fill(mask == 0, 0.0)


@dataclass
class MicroBatchMetrics:
    """Per-micro-batch numbers, reduced over ranks as TRL does (``accelerator.reduce`` / ``gather``)."""

    dist: Distributed
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """A token (or sequence) mean over every rank's micro-batch: Σ_ranks total / max(Σ_ranks count, 1)."""
        both = self.dist.reduce_sum(torch.stack([total.detach().float(), count.detach().float()]))
        self.sums[name] = both[0] / both[1].clamp(min=1.0)

    def extreme(self, name: str, values: torch.Tensor, largest: bool) -> None:
        """The min (or max) over every rank's sequences, NaNs left out; a micro-batch with none adds
        nothing to the step's mean (its helper count is 0)."""
        values = values.detach().float()
        values = values[~torch.isnan(values)]
        sign = -1.0 if largest else 1.0
        best = (sign * values).min() if values.numel() else torch.tensor(float("inf"), device=values.device)
        if self.dist.enabled:
            import torch.distributed as torch_dist

            best = best.clone()
            torch_dist.all_reduce(best, op=torch_dist.ReduceOp.MIN)
        present = torch.isfinite(best)
        self.sums[name] = torch.where(present, sign * best, torch.zeros_like(best))
        self.sums[COUNT_PREFIX + name] = present.float()


def finish_step_metrics(record: dict) -> dict:
    """A step's logged record with each helper-counted metric (``name`` + ``_n/name``, both divided by
    the step's micro-batches by the loop) turned into TRL's value: the mean over the micro-batches
    that had one (None when none had, as TRL logs)."""
    out = {k: v for k, v in record.items() if not k.startswith(COUNT_PREFIX)}
    for key, share in record.items():
        if key.startswith(COUNT_PREFIX):
            name = key[len(COUNT_PREFIX):]
            out[name] = record[name] / share if share > 0 else None
    return out


def clip_metrics(metrics: MicroBatchMetrics, coef: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                 epsilon_high: float, mask: torch.Tensor, per_token: bool) -> None:
    """``clip_ratio/low_mean`` (ratio below 1 - ε_low where the advantage is negative), ``/high_mean``
    (above 1 + ε_high where it is positive), ``/region_mean`` (either): shares of completion tokens, or
    of sequences when the ratio is per sequence; ``/low_min`` and ``/high_max`` over sequences."""
    low = ((coef < 1 - epsilon_low) & (advantages < 0)).float()
    high = ((coef > 1 + epsilon_high) & (advantages > 0)).float()
    region = ((low + high) > 0).float()
    for name, flags in (("low_mean", low), ("high_mean", high), ("region_mean", region)):
        if per_token:
            metrics.mean(f"clip_ratio/{name}", (flags * mask).sum(), mask.sum())
        else:
            n_rows = torch.tensor(float(flags.shape[0]), device=flags.device)
            metrics.mean(f"clip_ratio/{name}", flags.sum(), n_rows)
    if per_token:
        low_rows, high_rows = ((x * mask).sum(-1) / mask.sum(-1) for x in (low, high))  # 0/0: NaN, left out
    else:
        low_rows, high_rows = low.reshape(-1), high.reshape(-1)
    metrics.extreme("clip_ratio/low_min", low_rows, largest=False)
    metrics.extreme("clip_ratio/high_max", high_rows, largest=True)


@dataclass
class GRPOObjective:
    """GRPO's loss object for ``loop.train``; ``model`` is the (possibly DDP-wrapped) CompletionLogProbs
    of the policy. TRL's ``GRPOConfig`` names and defaults; ``epsilon_high`` None = ``epsilon_low``.
    ``max_completion_length`` is needed by "dr_grpo". ``dist``: the ranks the metrics are reduced over."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    max_completion_length: int | None = None
    dist: Distributed = field(default_factory=lambda: SINGLE_PROCESS)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type 'dr_grpo' divides by max_completion_length: give it")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low

    def count(self, batch: dict) -> int:
        """1: TRL averages its micro-batches' losses (see the module docstring)."""
        return 1

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> RLLoss:
        logps, entropy, mask = completion_forward(model, batch, device)
        advantages = batch["advantages"].to(device=device, dtype=logps.dtype)[:, None]
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(device=device, dtype=logps.dtype)

        log_ratio = logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        coef = torch.exp(log_ratio)  # [B, C], or [B, 1] per sequence
        clipped = torch.clamp(coef, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token = -torch.min(coef * advantages, clipped * advantages)
        if self.beta != 0.0:
            ref = batch["ref_logps"].to(device=device, dtype=logps.dtype)
            kl = torch.exp(ref - logps) - (ref - logps) - 1  # k3: ≥ 0, unbiased for KL(π ‖ π_ref)
            if self.use_bias_correction_kl:
                kl = kl * coef  # the tokens were sampled from π_old: importance-weight the estimate
            per_token = per_token + self.beta * kl

        loss = self.aggregate(per_token * mask, mask, batch)
        metrics = MicroBatchMetrics(self.dist)
        if self.beta != 0.0:
            metrics.mean("kl", (kl * mask).sum(), mask.sum())
        metrics.mean("entropy", (entropy * mask).sum(), mask.sum())
        clip_metrics(metrics, coef, advantages, self.epsilon_low, self.epsilon_high, mask,
                     per_token=self.importance_sampling_level == "token")
        return RLLoss(loss, metrics.sums)

    def aggregate(self, token_losses: torch.Tensor, mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """TRL's loss of one micro-batch (before the division by the step's micro-batches)."""
        if self.loss_type == "grpo":
            return (token_losses.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "bnpo":
            return token_losses.sum() / mask.sum().clamp(min=1.0)
        if self.loss_type == "dr_grpo":
            return token_losses.sum() / (token_losses.shape[0] * self.max_completion_length)
        return token_losses.sum() / batch["tokens_per_micro_batch"]


@dataclass
class RLOOObjective:
    """RLOO's loss object for ``loop.train`` (TRL's ``RLOOTrainer``): one ratio per completion, exp of
    its summed log-ratio to the sampling weights (``old_logps`` are always needed), clipped as PPO,
    averaged over the micro-batch's completions. The KL to the reference is not in the loss: it was
    subtracted from the reward (``advantages.sequence_kl``)."""

    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    dist: Distributed = field(default_factory=lambda: SINGLE_PROCESS)

    def __post_init__(self):
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low

    def count(self, batch: dict) -> int:
        """1: TRL averages its micro-batches' losses."""
        return 1

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> RLLoss:
        logps, entropy, mask = completion_forward(model, batch, device)
        old = batch["old_logps"].to(device=device, dtype=logps.dtype)
        advantages = batch["advantages"].to(device=device, dtype=logps.dtype)
        coef = torch.exp((logps * mask).sum(1) - (old * mask).sum(1))
        clipped = torch.clamp(coef, 1 - self.epsilon_low, 1 + self.epsilon_high)
        loss = (-torch.min(coef * advantages, clipped * advantages)).mean()

        metrics = MicroBatchMetrics(self.dist)
        metrics.mean("entropy", (entropy * mask).sum(), mask.sum())
        clip_metrics(metrics, coef, advantages, self.epsilon_low, self.epsilon_high, mask, per_token=False)
        return RLLoss(loss, metrics.sums)
