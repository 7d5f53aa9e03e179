"""Numeric precision of a run, as one object built once from the config.

``Precision("bf16", device)`` is everything the loop, evaluation and the benchmarks need to
know about precision: the autocast context of the forward pass, the ``GradScaler`` (enabled
for fp16 only, so fp16 can never run without loss scaling), whether the device supports it,
and its state for checkpoints. Nothing else in minift interprets a precision string.

Names are spelled the same in every config section: ``fp32``, ``bf16``, ``fp16`` (and
``fp64`` for the storage dtype of weights, ``model.dtype``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from .errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
AUTOCAST_PRECISIONS = ("fp32", "bf16", "fp16")  # what train.precision may be (fp64 is a storage dtype only)


def dtype_of(name: str, where: str = "dtype") -> torch.dtype:
    """The torch dtype spelled ``name`` (``fp32``, ``bf16``, ``fp16``, ``fp64``)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"{where} {name!r} is not a dtype minift knows: {sorted(DTYPES)}") from None


class Precision:
    """The precision of the training step: the autocast context and the gradient scaler.

    fp32: no autocast, scaler disabled (its calls are no-ops). bf16: autocast to bfloat16,
    no scaling (bf16 has fp32's exponent range). fp16: autocast to float16 with dynamic loss
    scaling; overflowing steps are skipped by the scaler and counted by the loop.
    """

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu"):
        if name not in AUTOCAST_PRECISIONS:
            raise InputError(f"precision {name!r}: choose one of {list(AUTOCAST_PRECISIONS)}")
        self.name = name
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=name == "fp16")

    def autocast(self):
        """The context the forward pass runs in (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def warn_if_slow(self) -> None:
        """bf16/fp16 on a CPU without native bf16 support emulates it and runs slower than fp32."""
        if self.name != "fp32" and self.device.type == "cpu" and not _cpu_has_native_bf16():
            warnings.warn(f"{self.name} on this CPU has no native support and runs slower than fp32 "
                          f"(benchmarks/RESULTS.md); use train.precision = \"fp32\" on CPU", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise InputError(f"checkpoint was trained in {state['name']}, this run asks for {self.name}")
        self.scaler.load_state_dict(state["scaler"])

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, device={str(self.device)!r})"


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False
