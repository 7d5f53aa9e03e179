"""AdamW with Trainer's weight-decay split, and Trainer's learning-rate schedules."""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .errors import InputError

# Trainer.get_decay_parameter_names: names matching these get no weight decay ...
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
# ... nor do the parameters of normalization modules.
_NORM_MODULES = (nn.LayerNorm,)


SCHEDULES = ("constant", "linear", "cosine")  # transformers' get_*_schedule_with_warmup


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Parameters that get weight decay: not in a LayerNorm, name matching no bias/norm pattern.
    ``named_parameters`` lists a tied parameter once, so the tied head is counted once."""
    in_norm = {f"{module_name}.{p}" if module_name else p
               for module_name, module in model.named_modules() if isinstance(module, _NORM_MODULES)
               for p, _ in module.named_parameters(recurse=False)}
    return [name for name, _ in model.named_parameters()
            if name not in in_norm and not _NO_DECAY_NAME.search(name.lower())]


def fused_adamw_supported(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu", "mps", "xpu")


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
               fused: str = "auto") -> torch.optim.AdamW:
    """AdamW over the parameters that require a gradient (all of them, or a LoRA adapter's
    with the base frozen: Trainer's ``create_optimizer`` filters the same way), in a weight-decay
    group and a no-decay group split as ``decay_parameter_names``."""
    decay = set(decay_parameter_names(model))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise InputError(f"{type(model).__name__} has no parameter that requires a gradient: "
                         f"nothing to train")
    groups = [
        {"params": [p for n, p in params.items() if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
    ]
    device = next(iter(params.values())).device
    use_fused = fused == "yes" or (fused == "auto" and fused_adamw_supported(device))
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=use_fused or None,
                             foreach=None if use_fused else False)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr before scheduler step k (k = 0 for the first optimizer step),
    as transformers' get_{constant,linear,cosine}_schedule_with_warmup."""
    def constant(k: int) -> float:
        return k / max(1, warmup_steps) if k < warmup_steps else 1.0

    def linear(k: int) -> float:
        if k < warmup_steps:
            return k / max(1, warmup_steps)
        return max(0.0, (total_steps - k) / max(1, total_steps - warmup_steps))

    def cosine(k: int) -> float:
        if k < warmup_steps:
            return k / max(1, warmup_steps)
        progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    schedules = {"constant": constant, "linear": linear, "cosine": cosine}
    if schedule not in schedules:
        raise InputError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    return schedules[schedule]


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0
                   ) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
