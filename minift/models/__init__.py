"""Causal LM architectures, chosen by the ``model_type`` of a transformers ``config.json``:
GPT-1 (``openai-gpt``), GPT-2 (``gpt2``) and the Llama-shaped decoders (``llama``, ``qwen2``,
``qwen3``, ``mistral``)."""
from .base import CausalLM
from .config import CONFIG_CLASSES, ConfigError, GPT2Config, GPTConfig, ModelConfig, config_from_json_file
from .decoder_config import (
    DECODER_CONFIGS,
    DecoderConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from .gpt1 import GPT1LMHeadModel
from .gpt2 import GPT2LMHeadModel
from .llama import DECODER_CLASSES, DecoderLM
from .lm_loss import IGNORE_INDEX, LossOutput

CONFIG_CLASSES.update(DECODER_CONFIGS)  # config_from_json_file reads model_type through this table

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    GPTConfig.model_type: GPT1LMHeadModel,
    GPT2Config.model_type: GPT2LMHeadModel,
    **DECODER_CLASSES,
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


__all__ = [
    "CONFIG_CLASSES",
    "IGNORE_INDEX",
    "MODEL_CLASSES",
    "CausalLM",
    "ConfigError",
    "DecoderConfig",
    "DecoderLM",
    "GPT1LMHeadModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPTConfig",
    "LlamaConfig",
    "LossOutput",
    "MistralConfig",
    "ModelConfig",
    "Qwen2Config",
    "Qwen3Config",
    "build_model",
    "config_from_json_file",
]
