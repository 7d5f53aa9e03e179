"""minift: fine-tuning of causal language models in plain PyTorch.

The public API, re-exported here and nothing else.
"""
from .collate import Collator
from .config import RunConfig, load_config
from .distributed import Distributed
from .hub import CheckpointError, from_pretrained
from .loop import Hooks, NextTokenLoss, TrainState, train
from .models import GPT1LMHeadModel, GPT2Config, GPT2LMHeadModel, GPTConfig, build_model
from .precision import Precision
from .tokenizer import Tokenizer, load_tokenizer, resize_model_embeddings

__version__ = "0.1.0"


def __getattr__(name: str):
    # the recipes pull in `datasets`: import them only when asked for
    if name == "run":
        from .finetune import run

        return run
    if name in ("run_stage", "Stage", "RunContext"):
        from . import orchestration

        return getattr(orchestration, name)
    raise AttributeError(f"module 'minift' has no attribute {name!r}")

__all__ = ["from_pretrained", "load_tokenizer", "resize_model_embeddings", "Tokenizer", "GPTConfig",
           "GPT2Config", "GPT1LMHeadModel", "GPT2LMHeadModel", "build_model", "CheckpointError", "train",
           "TrainState", "Hooks", "NextTokenLoss", "Precision", "Distributed", "Collator", "run", "run_stage",
           "Stage", "RunContext", "load_config", "RunConfig"]
