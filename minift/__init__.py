"""minift: fine-tuning of causal language models in plain PyTorch.

The public API, re-exported here and nothing else.
"""
from .hub import CheckpointError, from_pretrained
from .models import GPT1LMHeadModel, GPT2Config, GPT2LMHeadModel, GPTConfig, build_model
from .tokenizer import Tokenizer, load_tokenizer, resize_model_embeddings

__version__ = "0.1.0"

__all__ = ["from_pretrained", "load_tokenizer", "resize_model_embeddings", "Tokenizer", "GPTConfig",
           "GPT2Config", "GPT1LMHeadModel", "GPT2LMHeadModel", "build_model", "CheckpointError"]
