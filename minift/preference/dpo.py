"""Direct Preference Optimization: the loss the SFT loop calls instead of the LM forward.

    one forward over [chosen rows; rejected rows]        (PairCollator, one padded batch)
    -> summed log-prob of each row's completion tokens    (SequenceLogProbs)
    -> the same for the reference: a frozen copy of the initial policy, or log-probs
       precomputed once before training (no second model in memory, no second forward), or with
       LoRA the policy with its adapter off (no second model in memory)
    -> Δ = (chosen - ref_chosen) - (rejected - ref_rejected) -> per-pair loss (sigmoid / ipo / hinge)
    -> loss summed over pairs + TRL's metrics, summed; the loop divides both by the window's pairs

Formulas as TRL's DPOTrainer (1.16) computes them; ``label_smoothing`` is the conservative-DPO
smoothing of the sigmoid loss (TRL 1.16 applies it only to its other loss types, see docs/trainer-map.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import adapters_disabled
from ..models.layers import IGNORE_INDEX, is_right_padded
from .config import LOSS_TYPES
from .pairs import PairLoss

PAIR_INPUTS = ("input_ids", "attention_mask", "labels")


class SequenceLogProbs(nn.Module):
    """Wraps a ``CausalLM``: forward returns, per row, the summed log-probability of the tokens
    whose label is not -100 (the completion). Only those positions go through the LM head.
    A module of its own so DDP can wrap it (the forward DDP sees is the one that runs)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        mask = None if is_right_padded(attention_mask) else attention_mask  # right padding: causal is enough
        hidden = self.lm.hidden_states(input_ids, mask)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logits = F.linear(hidden[:, :-1][keep], self.lm.lm_head_weight).to(dtype)
        token_logps = logits.log_softmax(-1).gather(1, targets[keep][:, None]).squeeze(1)
        row_of_token = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(targets)[keep]
        return torch.zeros(len(input_ids), dtype=dtype, device=input_ids.device).index_add(0, row_of_token,
                                                                                             token_logps)


def pair_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in PAIR_INPUTS}


def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, loss_type: str,
               label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss from the log-ratios log π/π_ref of chosen and rejected completions.

    sigmoid: -(1-ε) log σ(βΔ) - ε log σ(-βΔ)        (DPO; ε = label_smoothing, cDPO)
    hinge:   max(0, 1 - βΔ)                          (SLiC)
    ipo:     (Δ_c/n_c - Δ_r/n_r - 1/(2β))²           (IPO, log-ratios averaged per completion token
                                                      as TRL does)
    """
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                - label_smoothing * F.logsigmoid(-beta * delta))
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        per_token = (chosen_logratios / chosen_tokens.clamp(min=1)) \
            - (rejected_logratios / rejected_tokens.clamp(min=1))
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


@torch.no_grad()
def adapter_off_logps(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference of a LoRA policy: the same model (wrapped for DDP or FSDP, compiled or not) with
    its adapter off (``lora.adapters_disabled``), in eval mode as a frozen reference runs: the base
    model's log-probs, without a second copy of it in memory."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return model(**inputs)
    finally:
        model.train(was_training)


@torch.no_grad()
def precompute_reference_logps(scorer: SequenceLogProbs, batches: list[dict], n_pairs: int,
                               device: torch.device, autocast) -> torch.Tensor:
    """[n_pairs, 2] reference log-probs (chosen, rejected) of every pair, in eval mode, once."""
    was_training = scorer.training
    scorer.eval()
    out = torch.full((n_pairs, 2), float("nan"), dtype=torch.float64)
    for batch in batches:
        with autocast:
            logps = scorer(**pair_inputs(batch, device)).double().cpu()
        chosen, rejected = logps.chunk(2)
        out[batch["pair_index"], 0], out[batch["pair_index"], 1] = chosen, rejected
    scorer.train(was_training)
    if torch.isnan(out).any():
        raise RuntimeError("precompute_reference_logps: some pairs were not in the batches")
    return out


@dataclass
class DPOObjective:
    """The DPO objective (``loop.train`` gets it wrapped in ``PairObjective``): ``model`` is the
    (possibly DDP-wrapped) SequenceLogProbs of the policy. Exactly one of ``reference`` (frozen
    SequenceLogProbs, eval mode) and ``reference_logps`` ([n_pairs, 2], indexed by the batch's
    ``pair_index``) is set."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: SequenceLogProbs | None = None
    reference_logps: torch.Tensor | None = None
    adapter_off_reference: bool = False  # LoRA: the policy itself with its adapter off (no second model)

    def reference_for(self, batch: dict,
                      inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_logps is not None:
            ref = self.reference_logps[batch["pair_index"]].to(inputs["input_ids"].device)
            return ref[:, 0], ref[:, 1]
        with torch.no_grad():
            return self.reference(**inputs).chunk(2)

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> PairLoss:
        inputs = pair_inputs(batch, device)
        if self.adapter_off_reference:  # first: under FSDP a no-grad forward between forward and backward
            ref_chosen, ref_rejected = adapter_off_logps(model, inputs).chunk(2)
        chosen_logps, rejected_logps = model(**inputs).chunk(2)
        if not self.adapter_off_reference:
            ref_chosen, ref_rejected = self.reference_for(batch, inputs)
        chosen_ratio = chosen_logps - ref_chosen.to(chosen_logps.dtype)
        rejected_ratio = rejected_logps - ref_rejected.to(rejected_logps.dtype)
        # ipo's per-token average: every completion token counted, as TRL's unshifted completion mask
        # does (with an empty prompt the first one, which nothing predicts, is counted but has no log-prob)
        chosen_tokens, rejected_tokens = (inputs["labels"] != IGNORE_INDEX).sum(1).chunk(2)
        losses = dpo_losses(chosen_ratio, rejected_ratio, self.beta, self.loss_type, self.label_smoothing,
                            chosen_tokens, rejected_tokens)
        chosen_rewards, rejected_rewards = (self.beta * chosen_ratio.detach(),
                                            self.beta * rejected_ratio.detach())
        metrics = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                   "logps/chosen": chosen_logps.detach().sum(),
                   "logps/rejected": rejected_logps.detach().sum()}
        return PairLoss(losses.sum(), metrics)
