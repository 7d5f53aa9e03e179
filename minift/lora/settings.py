"""What a LoRA adapter is: rank, alpha, dropout, which modules it wraps, which biases and whole
modules train beside it, and how it starts — with the names, defaults and meaning of peft's
``LoraConfig`` (peft/tuners/lora/config.py, 0.21), so an ``adapter_config.json`` maps onto it
field by field and back.

| minift           | peft                 | meaning                                                      |
|------------------|----------------------|--------------------------------------------------------------|
| r                | r                    | rank of the update B A                                       |
| alpha            | lora_alpha           | the update is scaled by alpha / r (alpha / sqrt(r): rslora)  |
| dropout          | lora_dropout         | dropout on the adapter's input (the base path sees x)        |
| target_modules   | target_modules       | list: module names matched by suffix; str: a full regex;     |
|                  |                      | "all-linear": every linear layer but the LM head             |
| use_rslora       | use_rslora           | scaling alpha / sqrt(r) (Kalajdzievski 2023)                 |
| bias             | bias                 | "none", "lora_only" (biases of wrapped layers train), "all"  |
| modules_to_save  | modules_to_save      | modules trained in full as a copy (the original is kept)     |
| init             | init_lora_weights    | "kaiming" (True: A Kaiming-uniform a=sqrt(5), B zeros),      |
|                  |                      | "gaussian" (A normal std 1/r, B zeros)                       |
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

BIASES = ("none", "lora_only", "all")
INITS = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"
# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the families minift has (openai-gpt,
# absent there, has GPT-2's fused q|k|v projection under the same name)
DEFAULT_TARGET_MODULES = {"gpt2": ("c_attn",), "openai-gpt": ("c_attn",), "llama": ("q_proj", "v_proj")}
# adapter_config.json fields minift writes and reads; any other peft feature set to a non-default
# value (DoRA, rank_pattern, layers_to_transform, ...) is refused on load
PEFT_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
               "modules_to_save", "use_rslora", "fan_in_fan_out", "init_lora_weights",
               "base_model_name_or_path", "inference_mode", "revision")
PEFT_DEFAULTS = {"use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
                 "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                 "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                 "use_qalora": False, "megatron_config": None, "alora_invocation_tokens": None,
                 "arrow_config": None, "use_bdlora": None, "velora_config": None, "monteclora_config": None,
                 "kasa_config": None}


class LoraSettingsError(InputError):
    """LoRA settings or an adapter that minift refuses (exit 2)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None  # None: DEFAULT_TARGET_MODULES of the model type
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] = field(default=())
    init: str = "kaiming"

    def __post_init__(self):
        # lists (TOML, JSON; peft writes a set as a list in any order) become sorted tuples: the
        # settings are hashable and compare by value (the order of the names changes nothing)
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                object.__setattr__(self, name, tuple(sorted(set(value), key=str)))
        self.validate()

    def validate(self, source: str = "[lora]") -> None:
        def refuse(message: str):
            raise LoraSettingsError(f"{source}: {message}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            refuse(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.alpha) or not (math.isfinite(self.alpha) and self.alpha > 0):
            refuse(f"alpha must be a positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            refuse(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIASES:
            refuse(f"bias must be one of {', '.join(map(repr, BIASES))}, got {self.bias!r}")
        if self.init not in INITS:
            refuse(f"init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            refuse(f"use_rslora must be true or false, got {self.use_rslora!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                refuse('target_modules is empty: give module names, a regex, or "all-linear"')
            try:
                re.compile(targets)
            except re.error as err:
                refuse(f"target_modules {targets!r} is not a valid regular expression ({err})")
        elif targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
            refuse(f"target_modules must be a non-empty list of module names, got {list(targets)!r}")
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            refuse(f"modules_to_save must be a list of module names, got {list(self.modules_to_save)!r}")

    @property
    def scaling(self) -> float:
        """What B A x is multiplied by: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def with_targets_for(self, model_type: str | None) -> LoraSettings:
        """These settings with ``target_modules`` filled in from peft's default for the model type."""
        if self.target_modules is not None:
            return self
        if model_type not in DEFAULT_TARGET_MODULES:
            raise LoraSettingsError(f"[lora]: target_modules not given and minift has no default for "
                                    f"model type {model_type!r}; name the layers to adapt")
        return LoraSettings(**{**self.__dict__, "target_modules": DEFAULT_TARGET_MODULES[model_type]})

    # -- peft's adapter_config.json ---------------------------------------------------------------
    def to_peft_config(self, fan_in_fan_out: bool, task_type: str | None = "CAUSAL_LM",
                       base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` peft's ``LoraConfig.from_pretrained`` reads back to these settings.
        ``fan_in_fan_out``: the wrapped layers store weights [in, out] (GPT-2's Conv1D; peft sets it
        itself for them)."""
        targets = self.target_modules
        config = {
            "peft_type": "LORA", "task_type": task_type, "r": self.r,
            "lora_alpha": int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) or targets is None else list(targets),
            "bias": self.bias, "modules_to_save": list(self.modules_to_save) or None,
            "use_rslora": self.use_rslora, "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "revision": None,
            "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None,
        }
        return dict(sorted(config.items()))

    @classmethod
    def from_peft_config(cls, config: dict[str, Any], source: str = "adapter_config.json") -> LoraSettings:
        """Settings from a peft ``adapter_config.json``; a peft feature minift does not implement
        (DoRA, per-layer ranks, ...) is refused naming the field."""
        if config.get("peft_type") != "LORA":
            raise LoraSettingsError(f"{source}: peft_type {config.get('peft_type')!r}; minift loads LoRA "
                                    f"adapters only")
        for key, default in PEFT_DEFAULTS.items():
            if config.get(key, default) not in (default, None, {}, [], False):
                raise LoraSettingsError(f"{source}: {key} = {config[key]!r} is a peft feature minift does "
                                        f"not implement; only plain LoRA adapters load")
        init = config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            init = True  # pissa, olora, ... only change the starting point: the saved A, B are what count
        targets = config.get("target_modules")
        try:
            return cls(r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                       dropout=config.get("lora_dropout", 0.0),
                       target_modules=list(targets) if isinstance(targets, (list, tuple, set)) else targets,
                       use_rslora=bool(config.get("use_rslora", False)), bias=config.get("bias", "none"),
                       modules_to_save=list(config.get("modules_to_save") or ()),
                       init="gaussian" if init == "gaussian" else "kaiming")
        except LoraSettingsError as err:
            raise LoraSettingsError(f"{source}: {str(err).split(': ', 1)[1]}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
