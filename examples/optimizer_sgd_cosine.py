"""Change 2, another optimizer and schedule: SGD with Nesterov momentum, cosine decay to a floor.

``orchestration.run_stage`` builds the optimizer and its schedule once a stage has built its parts,
with the stage's ``build_optimizer(cfg, model)`` and ``build_scheduler(cfg, optimizer, total_steps)``;
by default ``minift/components.py``'s (AdamW with Trainer's weight-decay groups, the schedule
``train.schedule`` names). Replace them in the ``Stage`` as any other part. The loop takes any
``torch.optim.Optimizer`` and any scheduler with ``step()`` (``optim.guarded_step`` clips, steps,
schedules and zeroes the gradients); checkpoints save and resume their ``state_dict``.

The schedule here is one that ``train.schedule`` cannot name: linear warm-up over ``train.warmup_ratio``
of the steps, then a cosine from ``train.lr`` down to FLOOR x ``train.lr`` (not to zero). SGD wants a
far larger learning rate than AdamW (0.5 did best of 0.5, 1, 2 and 5 here):

    python3 examples/optimizer_sgd_cosine.py configs/offline-default.toml --set train.lr=0.5

Among its last lines (other CPUs round the last digits differently):

    done: 600 steps
      train loss: step 1 5.5476 -> step 600 1.2748, mean 2.0435
    SGD (momentum 0.9, Nesterov), lr by step: 1 0.0000, 2 0.0167, 3 0.0333, 301 0.2936, 600 0.0500

The lr each step used is ``lr`` in ``metrics.jsonl``: 30 warm-up steps (ceil(0.05 x 600)), the full
0.5 at step 31, the floor 0.05 at the end. In the same 600 steps SGD learns more slowly than the stock
AdamW (train loss 0.9074, accuracy 1.00 from step 300 on): its loss falls, but its eval accuracy stays
near a third: chance.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from minift import finetune
from minift.cli import run_script
from minift.optim import decay_parameter_names, warmup_steps_for

MOMENTUM = 0.9
FLOOR = 0.1  # the last steps' learning rate, as a fraction of train.lr


def build_optimizer(cfg, model) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay as AdamW's (none on biases and LayerNorm weights)."""
    decay = set(decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for name, p in named if name in decay], "weight_decay": cfg.train.weight_decay},
              {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=MOMENTUM, nesterov=True)


def lr_factor(k: int, warmup: int, total: int) -> float:
    """The multiplier of train.lr for the step after ``k`` scheduler steps (k = 0: the first step)."""
    if k < warmup:
        return k / warmup
    progress = min(1.0, (k - warmup) / max(1, total - warmup))
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps_for(total_steps, cfg.train.warmup_steps, cfg.train.warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, warmup, total_steps))


def build_stage(ctx):
    """minift train with SGD and a cosine schedule to a floor."""
    stage = finetune.build_stage(ctx)
    return dataclasses.replace(stage, build_optimizer=build_optimizer, build_scheduler=build_scheduler)


def show_lr(cfg, summary) -> None:
    records = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").open()]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    last = max(lr)
    shown = sorted({1, 2, 3, last // 2 + 1, last} & lr.keys())
    shown_lr = ", ".join(f"{s} {lr[s]:.4f}" for s in shown)
    print(f"SGD (momentum {MOMENTUM:g}, Nesterov), lr by step: {shown_lr}")


def main(argv: list[str] | None = None) -> int:
    return run_script(build_stage, argv, after=show_lr)


if __name__ == "__main__":
    sys.exit(main())
