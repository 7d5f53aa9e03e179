"""Putting an adapter into a model and taking it out again.

``apply_lora`` finds the modules the settings name, the way peft finds them
(peft/tuners/tuners_utils.py ``check_target_module_exists``, peft/utils/other.py ``_set_trainable``):

- ``target_modules`` as a list: a module whose dotted name equals an entry or ends with
  ``"." + entry`` (``"c_proj"`` wraps both ``attn.c_proj`` and ``mlp.c_proj``; ``"attn.c_proj"``
  only the first); as a string: a regex the whole name must match; ``"all-linear"``: every
  linear layer but the LM head. Modules inside a ``modules_to_save`` module are left out.
- ``modules_to_save``: a module whose name ends with an entry (peft's plain ``endswith``).

Unlike peft, every entry must match something: a misspelt name is refused with the names that
exist, instead of quietly training fewer layers. It then freezes every base parameter, wraps the
targets in ``LoraLinear`` (initialised in module order from ``generator``), the saved modules in
``TrainedCopy``, and lets the biases ``bias`` names train. The adapter's parameters, what the
optimizer and a checkpoint hold, are ``trainable_parameters(model)``.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..models.base import CausalLM
from .modules import LoraLinear, TrainedCopy, linear_features
from .settings import ALL_LINEAR, LoraSettings, LoraSettingsError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile`` or DDP wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif getattr(model, "_orig_mod", None) is not None:
            model = model._orig_mod
        else:
            return model


def lora_settings(model: nn.Module) -> LoraSettings | None:
    """The settings of the adapter in ``model``, None when it has none."""
    return getattr(unwrap(model), "lora_settings", None)


# -- finding the modules ------------------------------------------------------------------------------
def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) producing the logits: never a LoRA target under "all-linear"."""
    head = getattr(model, "lm_head", None)
    if hasattr(model, "get_output_embeddings"):  # a transformers model
        head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if head is not None and module is head}


def saved_module_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Modules ``modules_to_save`` selects (outermost only); each entry must select one."""
    names = [name for name, _ in model.named_modules() if name]
    chosen: list[str] = []
    for key in settings.modules_to_save:
        found = [n for n in names if n.endswith(key)]
        if not found:
            short = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise LoraSettingsError(f"[lora] modules_to_save: {key!r} matches no module of "
                                    f"{type(model).__name__}; its modules are named {', '.join(short)}")
        chosen += [n for n in found if n not in chosen]
    return [n for n in chosen if not any(n.startswith(outer + ".") for outer in chosen)]


def target_module_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The modules LoRA wraps, in the model's module order (see the module docstring)."""
    saved = settings.modules_to_save
    named = [(n, m) for n, m in model.named_modules() if n
             and not any(re.match(rf"(^|.*\.){key}($|\..*)", n) for key in saved)]
    linear = [n for n, m in named if linear_features(m) is not None]
    targets = settings.target_modules
    if targets == ALL_LINEAR:
        heads = output_head_names(model)
        return [n for n in linear if n not in heads]
    if isinstance(targets, str):
        found = [n for n, _ in named if re.fullmatch(targets, n)]
        if not found:
            _refuse_unmatched(model, f"the regex {targets!r}", linear)
    else:
        found = []
        for key in targets:
            hits = [n for n, _ in named if n == key or n.endswith("." + key)]
            if not hits:
                _refuse_unmatched(model, repr(key), linear)
            found += hits
        found = [n for n, _ in named if n in set(found)]  # model order, once each
    modules = dict(named)
    for name in found:
        if linear_features(modules[name]) is None:
            kind = type(modules[name]).__name__
            raise LoraSettingsError(f"[lora] target_modules: {name} ({kind}) is not a linear layer; LoRA "
                                    f"wraps linear layers ({_short_names(linear)})")
    return found


def _short_names(names: list[str]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})) or "none"


def _refuse_unmatched(model: nn.Module, what: str, linear: list[str]) -> None:
    example = linear[-1] if linear else "attn.c_proj"
    raise LoraSettingsError(f"[lora] target_modules: {what} matches no module of {type(model).__name__}; "
                            f"its linear layers are named {_short_names(linear)} (an entry matches a module "
                            f"whose dotted name ends with it, e.g. {example!r})")


def _check_causal_lm(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """What minift's models cannot do with an adapter, refused in one line."""
    if not isinstance(model, CausalLM):
        return
    if model.lm_head is not None and "lm_head" in targets:
        raise LoraSettingsError("[lora] target_modules: lm_head — minift's LM head runs inside the loss "
                                "(chunked or fused with the cross-entropy) from its weight, so a LoRA update "
                                "there would never run; put lm_head in modules_to_save instead")
    embedding = f"{model.base_model_prefix}.{model.token_embedding_name}"
    if model.lm_head is None and embedding in saved:
        raise LoraSettingsError(f"[lora] modules_to_save: {embedding} is the token embedding the tied LM "
                                f"head reads; training a copy would untie them (peft keeps the head on the "
                                f"original)")


# -- putting it in --------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, settings: LoraSettings,
               generator: torch.Generator | None = None) -> nn.Module:
    """Freeze ``model`` and add the adapter ``settings`` describe (in place; the model is returned).
    ``generator`` draws the initial A matrices (default: torch's global RNG)."""
    model = unwrap(model)
    if lora_settings(model) is not None:
        raise LoraSettingsError("[lora]: the model already holds an adapter (merge_adapters it first)")
    settings = settings.with_targets_for(getattr(getattr(model, "config", None), "model_type", None))
    saved = saved_module_names(model, settings)
    targets = target_module_names(model, settings)
    _check_causal_lm(model, targets, saved)
    model.requires_grad_(False)
    for name in targets:
        layer = LoraLinear(model.get_submodule(name), settings.r, settings.scaling, settings.dropout)
        layer.init_adapter(settings.init, generator)
        _replace(model, name, layer)
    for name in saved:
        _replace(model, name, TrainedCopy(model.get_submodule(name)))
    model.lora_settings = settings
    trained = set(adapter_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter's parameters in ``model.named_parameters()`` order: every lora_A/lora_B,
    the copies of ``modules_to_save``, and the biases the settings' ``bias`` trains."""
    model = unwrap(model)
    settings = lora_settings(model)
    if settings is None:
        return []
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLinear):
            names |= {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
            if settings.bias == "lora_only" and module.base_layer.bias is not None:
                names.add(f"{prefix}.base_layer.bias")
        elif isinstance(module, TrainedCopy):
            names |= {f"{prefix}.modules_to_save.{p}" for p, _ in module.modules_to_save.named_parameters()}
    ordered = []
    for name, _ in model.named_parameters():
        is_bias = name == "bias" or name.endswith(".bias")
        if name in names or (settings.bias == "all" and is_bias and ".original_module." not in name):
            ordered.append(name)
    return ordered


def holds_adapter(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it: a reward model's backbone) holds LoRA layers or
    trained copies."""
    return any(isinstance(m, (LoraLinear, TrainedCopy)) for m in unwrap(model).modules())


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the optimizer should hold: the adapter's parameters when ``model`` has one, else every
    parameter that requires a gradient."""
    model = unwrap(model)
    params = dict(model.named_parameters())
    if lora_settings(model) is not None:
        return {name: params[name] for name in adapter_parameter_names(model)}
    return {name: p for name, p in params.items() if p.requires_grad}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model without its adapter (peft's ``disable_adapter``): the LoRA updates and the
    trained copies are skipped. Biases trained in place (``bias`` "lora_only"/"all") stay trained:
    with those the base is not the original one (peft alike)."""
    switches = [m for m in unwrap(model).modules() if isinstance(m, (LoraLinear, TrainedCopy))]
    before = [m.enabled for m in switches]
    for module in switches:
        module.enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(switches, before):
            module.enabled = enabled


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights: W += scaling * B A (transposed for Conv1D), each trained
    copy replaces its original. The model is plain again (every parameter trainable), computes
    what the adapted model computed, and ``save_pretrained`` writes it in transformers' layout."""
    model = unwrap(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            _replace(model, name, module.merged_layer())
        elif isinstance(module, TrainedCopy):
            _replace(model, name, module.modules_to_save)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    model.requires_grad_(True)
    return model


def merged_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The state dict ``merge_adapters`` would leave, without changing the model: every wrapped
    layer's weight plus scaling * B A under the layer's own keys, every trained copy under its
    original's keys. ``tensors``: the adapted model's state dict to merge (a gathered one);
    default: ``model.state_dict()``."""
    model = unwrap(model)
    state = dict(model.state_dict() if tensors is None else tensors)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLinear):
            a, b = state.pop(f"{prefix}lora_A.weight"), state.pop(f"{prefix}lora_B.weight")
            weight = state.pop(f"{prefix}base_layer.weight")
            wide = torch.promote_types(weight.dtype, torch.float32)
            delta = (b.to(wide) @ a.to(wide)) * module.scaling
            delta = delta.T if module.fan_in_fan_out else delta
            state[f"{prefix}weight"] = (weight.to(wide) + delta).to(weight.dtype)
            for key in [k for k in state if k.startswith(f"{prefix}base_layer.")]:
                state[prefix + key[len(f"{prefix}base_layer."):]] = state.pop(key)
        elif isinstance(module, TrainedCopy):
            for key in [k for k in state if k.startswith(f"{prefix}original_module.")]:
                del state[key]
            for key in [k for k in state if k.startswith(f"{prefix}modules_to_save.")]:
                state[prefix + key[len(f"{prefix}modules_to_save."):]] = state.pop(key)
    return state


# -- the adapter's tensors (checkpoints) ---------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's parameter names: all a checkpoint of a LoRA run
    needs besides the base checkpoint it started from."""
    params = trainable_parameters(model)
    return {name: p.detach() for name, p in params.items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                            source: str = "adapter") -> None:
    """Copy tensors saved by ``adapter_state_dict`` into the model's adapter (strict: the same
    names and shapes on both sides, or an error listing the differences)."""
    params = trainable_parameters(model)
    problems = [f"missing {k}" for k in params.keys() - tensors.keys()]
    problems += [f"unexpected {k}" for k in tensors.keys() - params.keys()]
    problems += [f"{k}: shape {tuple(tensors[k].shape)}, the model's is {tuple(params[k].shape)}"
                 for k in params.keys() & tensors.keys() if tensors[k].shape != params[k].shape]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise LoraSettingsError(f"{source} does not match the model's adapter: "
                                + "; ".join(sorted(problems)[:6]) + more)
    for name, param in params.items():
        param.copy_(tensors[name])
