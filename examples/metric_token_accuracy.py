"""Change 3, an extra metric in metrics.jsonl: next-token accuracy every step, the weight norm at
every evaluation.

A step's numbers come from the loss object: each entry of its ``metric_sums`` (a sum over the
micro-batch) is written next to ``loss``, divided by the step's count, as ``loss`` is. The
accuracy needs the logits, which the stock loss never makes (the model's fused head returns the
summed cross-entropy directly, ``minift/models/lm_loss.py``), so this loss object calls the model
without ``labels`` and computes the same cross-entropy from the logits (the loss curve is the stock
one) plus the count of targets the model ranks first.

An evaluation's numbers come from the stage's ``evaluate`` (a function returning a dict): wrap it and
add an entry. It is written to ``metrics.jsonl`` as ``{"step": N, "eval": {...}}`` and shown in the
summary's ``eval_before`` / ``eval_after`` lines.

    python3 examples/metric_token_accuracy.py configs/offline-default.toml

Among its last lines (other CPUs round the last digits differently):

    done: 600 steps
      train loss: step 1 5.5476 -> step 600 0.9070, mean 1.5321
      eval_before: loss 5.6545, perplexity 285.5609, accuracy 0.3533, macro_f1 0.2837, weight_norm 17.4444
      eval_after: loss 1.1754, perplexity 3.2393, accuracy 1.0000, macro_f1 1.0000, weight_norm 29.8129
    token_accuracy by step: 1 0.1949, 300 0.6250, 600 0.7109

The losses are the stock run's; every step record of ``metrics.jsonl`` also has ``token_accuracy``.
It stays well below 1: the words of a synthetic tweet are drawn at random, so only the rest of a word
once its first piece is seen, ``sentiment :`` and the label follow from what comes before.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minift import finetune
from minift.cli import run_script
from minift.collate import model_inputs
from minift.models import IGNORE_INDEX


@dataclasses.dataclass
class StepOutput:
    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor]


@dataclasses.dataclass
class NextTokenLossWithAccuracy:
    """The stock next-token cross-entropy (summed over the targets), and how many of the targets are
    the model's likeliest next token (``token_accuracy`` once divided by the count)."""

    def count(self, batch: dict) -> int:
        return batch["n_loss_targets"]  # the collator's count of targets (labels not -100 after the shift)

    def __call__(self, model, batch: dict, device: torch.device) -> StepOutput:
        inputs = model_inputs(batch, device)
        labels = inputs.pop("labels")
        logits = model(**inputs)[:, :-1].float()  # without labels: logits; position t predicts token t + 1
        targets = labels[:, 1:]
        loss_sum = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        correct = (logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)
        return StepOutput(loss_sum, {"token_accuracy": correct.sum()})


def weight_norm(model) -> float:
    """The L2 norm of all the model's weights (a tied embedding and head counted once)."""
    with torch.no_grad():
        return float(torch.sqrt(sum(p.double().pow(2).sum() for p in model.parameters())))


def build_stage(ctx):
    """minift train with next-token accuracy per step and the weight norm per evaluation."""
    stage = finetune.build_stage(ctx)

    def evaluate():
        return {**stage.evaluate(), "weight_norm": weight_norm(stage.model)}

    return dataclasses.replace(stage, loss=NextTokenLossWithAccuracy(), evaluate=evaluate)


def show_accuracy(cfg, summary) -> None:
    records = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").open()]
    accuracy = {r["step"]: r["token_accuracy"] for r in records if "token_accuracy" in r}
    last = max(accuracy)
    shown = sorted({1, last // 2, last} & accuracy.keys())
    print("token_accuracy by step: " + ", ".join(f"{s} {accuracy[s]:.4f}" for s in shown))


def main(argv: list[str] | None = None) -> int:
    return run_script(build_stage, argv, after=show_accuracy)


if __name__ == "__main__":
    sys.exit(main())
