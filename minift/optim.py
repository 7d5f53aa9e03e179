"""AdamW with Trainer's weight-decay split, Trainer's learning-rate schedules, and the guarded
optimizer step the loop takes after each window of micro-batches."""
from __future__ import annotations

import math
import re
import warnings

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


# -- the optimizer step ---------------------------------------------------------------------------
def skips_on_device(optimizer: torch.optim.Optimizer, scaler) -> bool:
    """Fused AdamW takes ``found_inf`` and skips a NaN/inf step on the device (no host sync);
    other optimizers, and fp16's GradScaler, need the check on the host."""
    return not scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False)


def guarded_step(optimizer: torch.optim.Optimizer, scheduler, scaler, params: list[torch.Tensor],
                 max_grad_norm: float, nonfinite: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """One optimizer step after the micro-batches' backward passes, as Trainer takes it:

        unscale (fp16) -> clip to max_grad_norm -> step -> schedule -> zero the gradients

    guarded twice: a step whose loss is NaN/inf (``nonfinite``, a device bool) changes no weight,
    and an fp16 step whose gradients overflowed is skipped by the GradScaler, which lowers its
    scale (the schedule then does not advance). Returns the pre-clip gradient norm (on the
    device), the lr the step used and whether the scaler skipped it."""
    on_device = skips_on_device(optimizer, scaler)
    if not on_device and bool(nonfinite):  # this optimizer cannot skip on the device: drop the gradients now
        optimizer.zero_grad(set_to_none=True)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over the sharded gradients, a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    lr = optimizer.param_groups[0]["lr"]
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    stepped = True
    if on_device:
        optimizer.found_inf = nonfinite.float()
        optimizer.step()
        del optimizer.found_inf
    elif not nonfinite:
        scaler.step(optimizer)
    else:
        stepped = False
    scaler.update()
    overflow = scaler.is_enabled() and scaler.get_scale() < scale_before
    if not overflow:
        with warnings.catch_warnings():  # a skipped first step is no misordered schedule
            if not stepped:
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, overflow
