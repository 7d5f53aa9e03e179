"""Small pretrained-looking bases for the LoRA / FSDP runs: a random model of each family saved with
the project's synthetic tokenizer (no shared material), and run configs that train on them."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from minift import synthetic
from minift.config import load_config
from minift.models import GPT2Config, GPTConfig, LlamaConfig, build_model
from minift.tokenizer import ensure_pad_token, load_tokenizer

from conftest import REPO

FAMILIES = ("openai-gpt", "gpt2", "llama")
_ROOT: list[Path] = []  # one folder of bases per test process (training the synthetic tokenizer takes 2 s)


def shared_root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="minift-bases-")))
        atexit.register(shutil.rmtree, _ROOT[0], ignore_errors=True)
    return _ROOT[0]


def synthetic_material(root: Path | None = None) -> tuple[Path, Path]:
    """The synthetic tweets and their tokenizer, written once (under ``root``, default: this process's)."""
    return synthetic.prepare((root or shared_root()) / "synthetic", seed=0)


def base_folder(root: Path | None = None, family: str = "openai-gpt", with_pad: bool = True,
                dropout: float = 0.0) -> Path:
    """``base-<family>``: a random model saved as a checkpoint, with the synthetic tokenizer (its [PAD]
    added when ``with_pad``; without, a run grows the vocabulary by that row); made once per process
    (``root`` None) or under ``root``."""
    root = root or shared_root()
    folder = root / f"base-{family}{'' if with_pad else '-nopad'}{f'-dropout{dropout}' if dropout else ''}"
    if (folder / "model.safetensors").exists():
        return folder
    tokenizer = load_tokenizer(synthetic_material(root)[1])
    if with_pad:
        tokenizer = ensure_pad_token(tokenizer, "auto")
    vocab = tokenizer.vocab_size
    drop = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    gpt = {"vocab_size": vocab, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, **drop}
    config = {"openai-gpt": lambda: GPTConfig(**gpt), "gpt2": lambda: GPT2Config(**gpt),
              "llama": lambda: LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=64, tie_word_embeddings=False)}[family]()
    torch.manual_seed(0)
    model = build_model(config)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def run_config(output_dir: Path, base: Path, *overrides: str, path: Path | None = None, stage=None):
    """A short run on ``base`` (the offline default's data and schedule, 8 steps), LoRA off unless
    the overrides set ``lora.r``; ``path``: another config (``stage``: its own sections' class)."""
    data = synthetic_material(base.parent)[0]
    if stage is None and path is not None and path.name.startswith(("dpo", "reward")):
        from minift.preference.config import PreferenceConfig as stage
    return load_config(path or REPO / "configs" / "offline-default.toml", stage=stage, overrides=[
        f'model.name="{base}"', 'model.tokenizer=""', "model.config={}", f'data.source="{data}"',
        f'train.output_dir="{output_dir}"', "train.progress=false", "train.plot=false",
        "data.max_train_examples=128", "data.sampler=random", "train.batch_size=8", "train.grad_accum=2",
        "train.max_steps=8", "train.eval_every=0", "eval.max_examples=24", "eval.before_training=false",
        "train.lr=1e-2", *overrides])


def cli_sets(config) -> list[str]:
    """Every value of ``config`` (the [lora] section included) as ``--set`` arguments."""
    import json

    sets = []
    for section in ("model", "data", "train", "eval", "lora"):
        for key, value in getattr(config, section).__dict__.items():
            if key != "config":
                sets += ["--set", f"{section}.{key}={json.dumps(value)}"]
    sets += ["--set", "model.config={}"]
    return sets
