"""Label smoothing (``train.label_smoothing``): the fine-tuning loss object that smooths the
next-token targets, as transformers' ``Trainer`` does with ``label_smoothing_factor``.

    batch -> labels taken out -> model(input_ids, ...) = logits over the true vocabulary
    -> shifted labels -> (1 - eps) * NLL + eps * mean over the vocabulary of -log p, summed
    -> the loop divides by the window's count (``NextTokenLoss.count``: the same denominator)

Trainer's ``LabelSmoother`` (trainer_pt_utils.py) divides both terms by ``num_items_in_batch``
inside each micro-batch; this object returns the sum and the loop divides by the same count, so
the step's loss and gradient are the same. The model's padding rows of the vocabulary
(``model.pad_vocab_to``) are not in its logits, so they do not widen the mean. The plain
cross-entropy rides along as ``nll`` in the step's record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .collate import model_inputs
from .loop import NextTokenLoss
from .models.lm_loss import label_smoothed_sums


class SmoothedLossOutput(NamedTuple):
    loss_sum: torch.Tensor  # the smoothed loss, summed over the micro-batch's targets
    n_loss_targets: int
    metric_sums: dict[str, torch.Tensor]  # {"nll": the plain summed cross-entropy}


@dataclass
class LabelSmoothedLoss(NextTokenLoss):
    """``NextTokenLoss`` with smoothed targets; ``count`` (the denominator) is unchanged."""

    epsilon: float = 0.1

    def __call__(self, model, batch: dict, device: torch.device) -> SmoothedLossOutput:
        inputs = model_inputs(batch, device)
        labels = inputs.pop("labels")  # as Trainer: the model returns logits, the loss is computed here
        smoothed, nll, n_targets = label_smoothed_sums(model(**inputs), labels, self.epsilon)
        return SmoothedLossOutput(smoothed, n_targets, {"nll": nll})
