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
    """A randomly initialized model for ``config`` (transformers' init)."""
    return MODEL_CLASSES[config.model_type](config)


__all__ = ["CausalLM", "GPTConfig", "GPT2Config", "ConfigError", "GPT1LMHeadModel", "GPT2LMHeadModel",
           "MODEL_CLASSES", "CONFIG_CLASSES", "ModelConfig", "build_model", "config_from_json_file", "IGNORE_INDEX",
           "LossOutput"]
