"""LoRA: train a low-rank update of chosen linear layers instead of the weights, exactly as peft
computes it (tests/test_lora.py compares forward, gradients and AdamW steps with peft).

    from minift.lora import LoraSettings, apply_lora, trainable_parameters, save_adapter

    model = minift.from_pretrained("gpt2")
    apply_lora(model, LoraSettings(r=8, alpha=16, target_modules=["c_attn", "c_proj"]),
               generator=torch.Generator().manual_seed(0))
    optimizer = make_adamw(model, lr=1e-4)          # holds only the adapter's parameters
    ...
    save_adapter(model, "out/model")                # peft's layout: PeftModel.from_pretrained loads it
    merge_adapters(model).save_pretrained("out/merged")   # full weights, transformers' layout

What is where:
  settings.py     ``LoraSettings`` (peft's ``LoraConfig`` fields) and adapter_config.json
  modules.py      ``LoraLinear`` (nn.Linear and GPT's Conv1D layouts), ``TrainedCopy`` (modules_to_save)
  apply.py        finding the modules, freezing, ``trainable_parameters``, ``adapters_disabled``,
                  ``merge_adapters``, ``adapter_state_dict`` / ``load_adapter_state_dict`` (checkpoints)
  peft_format.py  ``save_adapter`` / ``load_adapter``: peft's file layout and key names

Works on any ``nn.Module`` whose projections are ``nn.Linear`` or ``Conv1D`` (minift's models,
a transformers model); knows nothing of training loops.
"""
from .apply import (
    adapter_parameter_names,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    holds_adapter,
    load_adapter_state_dict,
    lora_settings,
    merge_adapters,
    merged_state_dict,
    trainable_parameters,
)
from .modules import LoraLinear, TrainedCopy
from .peft_format import load_adapter, load_peft_state_dict, peft_state_dict, read_adapter, save_adapter
from .settings import LoraSettings, LoraSettingsError

__all__ = ["LoraLinear", "LoraSettings", "LoraSettingsError", "TrainedCopy", "adapter_parameter_names",
           "adapter_state_dict", "adapters_disabled", "apply_lora", "holds_adapter", "load_adapter",
           "load_adapter_state_dict", "load_peft_state_dict", "lora_settings", "merge_adapters",
           "merged_state_dict", "peft_state_dict", "read_adapter",
           "save_adapter", "trainable_parameters"]
