"""Causal LM architectures, chosen by the ``model_type`` of a transformers ``config.json``."""
from .base import CausalLM
from .config import CONFIG_CLASSES, ConfigError, GPT2Config, GPTConfig, ModelConfig, config_from_json_file
from .gpt1 import GPT1LMHeadModel
from .gpt2 import GPT2LMHeadModel
from .lm_loss import IGNORE_INDEX, LossOutput

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    GPTConfig.model_type: GPT1LMHeadModel,
    GPT2Config.model_type: GPT2LMHeadModel,
}


def build_model(config) -> CausalLM:
    """A randomly initialized model for ``config`` (transformers' init). Its size is checked
    against the memory available first, so an impossible config fails at once instead of
    allocating (or building millions of modules) for minutes."""
    config.check_fits(available_memory_bytes())
    return MODEL_CLASSES[config.model_type](config)


def available_memory_bytes() -> int | None:
    """The memory the OS can give this process now (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


__all__ = ["CausalLM", "GPTConfig", "GPT2Config", "ConfigError", "GPT1LMHeadModel", "GPT2LMHeadModel",
           "MODEL_CLASSES", "CONFIG_CLASSES", "ModelConfig", "build_model", "config_from_json_file", "IGNORE_INDEX",
           "LossOutput"]
