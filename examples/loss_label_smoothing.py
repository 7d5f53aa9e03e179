"""Change 1, a new loss: label-smoothed cross-entropy as a loss object.

The loop (``minift/loop.py``) asks a loss object for two things:

    count(batch)                    this micro-batch's share of the step's denominator (a Python int)
    __call__(model, batch, device)  an object with ``loss_sum`` (summed over the micro-batch) and,
                                    optionally, ``metric_sums`` (a dict of summed tensors)

It divides every micro-batch's ``loss_sum`` by the count of the whole step (all its micro-batches, all
ranks), so gradient accumulation equals one big batch, and it writes ``loss`` and each entry of
``metric_sums``, divided by that same count, into ``metrics.jsonl``. The stock loss
(``minift.NextTokenLoss``) calls the model *with* ``labels``, and the model returns the summed
cross-entropy from its fused head (``minift/models/lm_loss.py``), never the logits; this one calls it
*without* ``labels`` to get the logits [batch, time, vocab], then shifts (position t predicts token t+1).

minift has this loss built in (``train.label_smoothing = 0.1``, ``minift/label_smoothing.py``, as
Trainer's ``label_smoothing_factor``); written out here it is the pattern for any loss of your own, and
``tests/test_examples.py`` checks that the two train alike, step for step.

The run is ``minift train``'s with one part replaced: ``build_stage`` calls the recipe's own
(``minift.finetune.build_stage``) and swaps its ``loss`` with ``dataclasses.replace``; ``run_script``
gives this file ``minift train``'s command line. From the repo root:

    python3 examples/loss_label_smoothing.py configs/offline-default.toml

Among its last lines (other CPUs round the last digits differently):

    done: 600 steps
      train loss: step 1 5.5602 -> step 600 1.6860, mean 2.2184
      eval_after: loss 1.2711, perplexity 3.5647, accuracy 1.0000, macro_f1 1.0000
    step 600: loss 1.6860 is 0.9 x nll 1.0041 + 0.1 x uniform 7.8232 (label smoothing 0.1)

``loss`` is what the optimizer minimised; ``nll``, logged through ``metric_sums``, is the plain
cross-entropy the stock loss logs (the stock run ends at 0.9074, eval loss 1.1753); ``uniform`` is the
mean of -log p over the vocabulary, which the smoothing keeps from growing without bound.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from minift import finetune
from minift.cli import run_script
from minift.collate import model_inputs
from minift.models import IGNORE_INDEX

SMOOTHING = 0.1


@dataclasses.dataclass
class SmoothedOutput:
    loss_sum: torch.Tensor  # summed over the micro-batch's targets
    metric_sums: dict[str, torch.Tensor]  # summed too; the loop logs each divided by the step's count


@dataclasses.dataclass
class LabelSmoothedLoss:
    """(1 - smoothing) x cross-entropy + smoothing x cross-entropy against the uniform distribution,
    summed over the next-token targets (the positions whose label is not -100)."""

    smoothing: float = SMOOTHING

    def count(self, batch: dict) -> int:
        return batch["n_loss_targets"]  # the collator counted the targets on the CPU: no device sync

    def __call__(self, model, batch: dict, device: torch.device) -> SmoothedOutput:
        inputs = model_inputs(batch, device)
        labels = inputs.pop("labels")
        logits = model(**inputs)  # without labels: logits [batch, time, vocab]
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
        targets = labels[:, 1:]
        counted = targets != IGNORE_INDEX
        nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        uniform = -log_probs.mean(dim=-1)
        loss = (1 - self.smoothing) * nll + self.smoothing * uniform
        sums = {"nll": (nll * counted).sum(), "uniform": (uniform * counted).sum()}
        return SmoothedOutput(loss_sum=(loss * counted).sum(), metric_sums=sums)


def build_stage(ctx):
    """minift train with a label-smoothed cross-entropy."""
    stage = finetune.build_stage(ctx)
    return dataclasses.replace(stage, loss=LabelSmoothedLoss(SMOOTHING))


def show_last_step(cfg, summary) -> None:
    records = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").open()]
    last = [r for r in records if "nll" in r][-1]
    print(f"step {last['step']}: loss {last['loss']:.4f} is {1 - SMOOTHING:g} x nll {last['nll']:.4f} "
          f"+ {SMOOTHING:g} x uniform {last['uniform']:.4f} (label smoothing {SMOOTHING:g})")


def main(argv: list[str] | None = None) -> int:
    return run_script(build_stage, argv, after=show_last_step)


if __name__ == "__main__":
    sys.exit(main())
