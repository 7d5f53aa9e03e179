"""The two modules an adapter puts into a model, computing what peft's ``lora.Linear`` and
``ModulesToSaveWrapper`` compute (peft/tuners/lora/layer.py, peft/utils/other.py, 0.21).

``LoraLinear`` wraps one linear layer, ``nn.Linear`` (weight [out, in]) or GPT's ``Conv1D``
(weight [in, out], peft's ``fan_in_fan_out``)::

    y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))

``lora_A`` is [r, in] and ``lora_B`` [out, r] in either layout; only a merge needs the layout
(B A is transposed for Conv1D). A starts Kaiming-uniform (a = sqrt(5), bound 1/sqrt(in), as
``nn.Linear``'s own init) or normal with std 1/r ("gaussian"); B starts at zero, so a new adapter
changes nothing. Under a half-precision base the adapter weights are float32 (peft's
``autocast_adapter_dtype``): the adapter path runs in float32 and is cast back.

``TrainedCopy`` holds a module trained in full (``modules_to_save``): a trainable copy used in
the forward, and the frozen original, used again when the adapters are switched off.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..models.layers import Conv1D

HALF_DTYPES = (torch.float16, torch.bfloat16)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer LoRA can wrap, None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class LoraLinear(nn.Module):
    """A linear layer plus its low-rank update (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float):
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D layers, not {type(base_layer).__name__}")
        in_features, out_features = features
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight stored [in, out]
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype
        # skip_init: no draw from the global RNG here; init_adapter decides the values
        place = {"bias": False, "device": weight.device, "dtype": dtype}
        self.lora_A = nn.utils.skip_init(nn.Linear, in_features, r, **place)
        self.lora_B = nn.utils.skip_init(nn.Linear, r, out_features, **place)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = scaling
        self.enabled = True  # False: the base layer alone (see apply.adapters_disabled)

    @torch.no_grad()
    def init_adapter(self, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        """peft's ``reset_lora_parameters``: A Kaiming-uniform(a=sqrt(5)) or N(0, 1/r^2), B zero.
        ``generator``: where the random numbers come from (default: torch's global RNG)."""
        if init == "gaussian":
            self.lora_A.weight.normal_(0.0, 1.0 / self.r, generator=generator)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return (result + update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in the base weight's layout ([out, in], or [in, out] for Conv1D), float32
        or wider, for a merge."""
        dtype = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        delta = (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_layer(self) -> nn.Module:
        """The base layer with the update added into its weight (the layer itself, changed in place)."""
        weight = self.base_layer.weight
        wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
        weight.copy_((wide + self.delta_weight()).to(weight.dtype))
        return self.base_layer

    # peft's tuner layers answer .weight / .bias with the base layer's: code that reads a
    # projection's weight (a dtype check, a tied head) keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        layout = "[in, out]" if self.fan_in_fan_out else "[out, in]"
        return f"r={self.r}, scaling={self.scaling:g}, layout={layout}"


class TrainedCopy(nn.Module):
    """A module trained in full next to the adapters: the forward runs the trainable copy
    (``modules_to_save``); with the adapters off it runs the frozen original."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.modules_to_save.requires_grad_(True)
        self.enabled = True

    @property
    def active(self) -> nn.Module:
        return self.modules_to_save if self.enabled else self.original_module

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        return self.active.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.active.bias
