"""Adapters on disk in peft's layout, so peft and minift load each other's.

A folder holds ``adapter_config.json`` (``LoraSettings.to_peft_config``) and
``adapter_model.safetensors``, whose keys are the model's parameter names behind
``base_model.model.`` with no adapter name (peft/utils/save_and_load.py
``get_peft_model_state_dict``)::

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight      [r, in]
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight      [out, r]
    base_model.model.transformer.h.0.attn.c_attn.base_layer.bias    bias = "lora_only" / "all"
    base_model.model.transformer.h.0.ln_1.bias                      bias = "all"
    base_model.model.transformer.ln_f.weight                        modules_to_save (the trained copy)

``PeftModel.from_pretrained(base, folder)`` loads such a folder onto the transformers model
(tests/test_lora.py); ``load_adapter`` puts a peft-written one onto a minift model. Vocabulary
rows (an untied head in ``modules_to_save``) are written without ``pad_vocab``'s padding rows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingFile
from ..hub import CheckpointError, from_pretrained, resolve, weights_present
from ..models.base import CausalLM
from ..models.config import config_from_json_file, read_json_object
from .apply import (
    apply_lora,
    load_adapter_state_dict,
    lora_settings,
    merge_adapters,
    trainable_parameters,
    unwrap,
)
from .modules import LoraLinear
from .settings import LoraSettings, LoraSettingsError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def peft_key(name: str) -> str:
    """The checkpoint key peft writes for a parameter of minift's adapted model (without the
    ``base_model.model.`` prefix): a trained copy is saved under its module's own name."""
    return name.replace(".modules_to_save.", ".")


def _vocab_row_names(model: nn.Module) -> set[str]:
    """Adapter parameters with one row per vocabulary entry (a trained copy of an untied head)."""
    if not isinstance(model, CausalLM):
        return set()
    vocab_keys = set(model.vocab_weight_keys())
    return {name for name in trainable_parameters(model) if peft_key(name) in vocab_keys}


def peft_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's checkpoint keys, vocabulary rows without padding.
    ``tensors``: the values to write, under the model's own names (a state dict gathered from
    shards); default: the parameters themselves."""
    model = unwrap(model)
    vocab_rows = _vocab_row_names(model)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    values = trainable_parameters(model)
    if tensors is not None:
        values = {name: tensors[name] for name in values}
    return {PEFT_PREFIX + peft_key(name): (p[:vocab_size] if name in vocab_rows else p).detach().contiguous()
            for name, p in values.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, settings: LoraSettings | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM",
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of ``model`` as peft does (``adapter_config.json`` +
    ``adapter_model.safetensors``). ``settings`` default to the ones the adapter was made with;
    ``tensors`` to the adapter's parameters (``peft_state_dict``)."""
    from safetensors.torch import save_file

    model = unwrap(model)
    settings = settings or lora_settings(model)
    if settings is None:
        raise LoraSettingsError("save_adapter: the model holds no adapter (apply_lora or load_adapter first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fan_in_fan_out = any(m.fan_in_fan_out for m in model.modules() if isinstance(m, LoraLinear))
    config = settings.to_peft_config(fan_in_fan_out, task_type, base_model_name_or_path)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(peft_state_dict(model, tensors), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def read_adapter(name_or_path: str | os.PathLike) -> tuple[LoraSettings, dict[str, torch.Tensor], Path]:
    """Settings and tensors of a peft adapter folder (or hub name), tensors under peft's keys."""
    directory = resolve(name_or_path, want=(ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN),
                        required=(ADAPTER_CONFIG,))
    if not (directory / ADAPTER_CONFIG).exists():
        raise MissingFile(f"{directory}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    settings = LoraSettings.from_peft_config(read_json_object(directory / ADAPTER_CONFIG),
                                             source=str(directory / ADAPTER_CONFIG))
    try:
        if (directory / ADAPTER_WEIGHTS).exists():
            from safetensors.torch import load_file

            tensors = load_file(str(directory / ADAPTER_WEIGHTS), device="cpu")
        elif (directory / ADAPTER_BIN).exists():
            tensors = torch.load(directory / ADAPTER_BIN, map_location="cpu", weights_only=True)
        else:
            raise MissingFile(f"{directory}: no {ADAPTER_WEIGHTS} or {ADAPTER_BIN}")
    except (MissingFile, OSError):
        raise
    except Exception as err:
        raise CheckpointError(f"{directory}: cannot read the adapter weights "
                              f"({type(err).__name__}: {err})") from err
    return settings, tensors, directory


def load_adapter(model: nn.Module, name_or_path: str | os.PathLike) -> nn.Module:
    """Add the peft adapter saved in ``name_or_path`` (a folder or hub name) to ``model``: its
    settings from ``adapter_config.json``, its tensors from the weights file (strict)."""
    settings, tensors, directory = read_adapter(name_or_path)
    model = apply_lora(unwrap(model), settings)
    load_peft_state_dict(model, tensors, source=str(directory))
    return model


def load_peft_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy tensors under peft's checkpoint keys into the model's adapter. Keys peft writes for
    its own bookkeeping (``original_module``, a second copy under ``modules_to_save``) are skipped."""
    model = unwrap(model)
    by_key = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        if ".original_module." in key:
            continue
        by_key.setdefault(peft_key(key), tensor)  # the plain key wins over the modules_to_save one
    params = trainable_parameters(model)
    names = {peft_key(name): name for name in params}
    vocab_rows = _vocab_row_names(model)
    mapped = {names.get(key, PEFT_PREFIX + key): tensor for key, tensor in by_key.items()}
    for name in vocab_rows & mapped.keys():
        missing_rows = params[name].shape[0] - mapped[name].shape[0]
        if missing_rows > 0:
            padding = mapped[name].new_zeros(missing_rows, *mapped[name].shape[1:])
            mapped[name] = torch.cat([mapped[name], padding])
    mapped = {k: v.to(params[k].dtype) if k in params else v for k, v in mapped.items()}
    load_adapter_state_dict(model, mapped, source=source)


# -- a model folder that holds an adapter: the base it names, plus the adapter --------------------------
def is_adapter_folder(name_or_path: str | os.PathLike) -> bool:
    """A local folder holding an adapter (``adapter_config.json``) and no full weights."""
    directory = Path(name_or_path).expanduser()
    return directory.is_dir() and (directory / ADAPTER_CONFIG).exists() and not weights_present(directory)


def adapter_base_name(directory: str | os.PathLike) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    directory = Path(directory).expanduser()
    base = read_json_object(directory / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise LoraSettingsError(f"{directory / ADAPTER_CONFIG} names no base model "
                                "(base_model_name_or_path): load the base with minift.from_pretrained "
                                "and add the adapter with minift.lora.load_adapter")
    return base


def load_adapted_model(directory: str | os.PathLike, dtype: torch.dtype | None = None,
                       device: str | torch.device | None = None, **config_overrides) -> CausalLM:
    """The base model an adapter folder names, its vocabulary grown as the training grew it (the
    folder's ``config.json``, when minift wrote one), the adapter added and merged into the
    weights: a plain model computing what the adapted one computed."""
    directory = Path(directory).expanduser()
    base = from_pretrained(adapter_base_name(directory), dtype=dtype, **config_overrides)
    if (directory / "config.json").exists():
        vocab_size = config_from_json_file(directory / "config.json").vocab_size
        if vocab_size > base.config.vocab_size:
            base.resize_token_embeddings(vocab_size)  # the rows the training added ([PAD]), as it added them
    model = merge_adapters(load_adapter(base, directory)).eval()
    return model.to(device=device) if device is not None else model
