"""Find checkpoints (local directory or Hugging Face hub name) and load them strictly.

A name that is not a local path is resolved through ``huggingface_hub``: its cache
(``HF_HOME`` / ``HF_HUB_CACHE``) and offline switch (``HF_HUB_OFFLINE=1``) are honoured.
Checkpoints use the transformers layout: ``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin`` (or their sharded ``*.index.json`` forms).
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from .errors import MiniftError, MissingFile
from .models import CausalLM, build_model, config_from_json_file
from .models.base import CONFIG_NAME
from .models.base import WEIGHTS_NAME as SAFE_WEIGHTS

SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")

# Hub names that were renamed: the old name redirects online, but a cache made under one
# name is not found under the other, so offline we try both.
HUB_ALIASES = {
    "openai-gpt": "openai-community/openai-gpt",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_REVERSE_ALIASES = {v: k for k, v in HUB_ALIASES.items()}

# Non-parameter buffers that older checkpoints carry: GPT-1/GPT-2 causal-mask ``attn.bias``
# (not to be confused with ``attn.c_attn.bias``), GPT-2's ``attn.masked_bias``, and the rotary
# frequencies Llama checkpoints saved before transformers 4.31 (recomputed from the config).
_LEGACY_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$|^position_ids$"
                            r"|^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


class CheckpointError(MiniftError, RuntimeError):
    """A checkpoint that cannot be found or does not match the model."""

    exit_code = 2


# -- resolution -------------------------------------------------------------------------------
def hub_candidates(name: str) -> list[str]:
    names = [name]
    for alias in (HUB_ALIASES.get(name), _REVERSE_ALIASES.get(name)):
        if alias and alias not in names:
            names.append(alias)
    return names


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def weights_present(directory: Path) -> bool:
    return any((directory / f).exists() for f in WEIGHT_FILES)


_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint (``HF_ENDPOINT``) opens within ``timeout``
    seconds; asked once per process. A failed DNS lookup answers at once."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _reachable:
        url = urlsplit(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            _reachable[endpoint] = True
        except OSError:
            _reachable[endpoint] = False
    return _reachable[endpoint]


def resolve(name_or_path: str | os.PathLike, want: tuple[str, ...], required: tuple[str, ...] = ()) -> Path:
    """A local directory holding the files of ``name_or_path``.

    A local directory is returned as it is. Otherwise ``name_or_path`` is a hub repo id
    and the files in ``want`` that exist are fetched (or found in the cache) with
    ``huggingface_hub``; ``required`` files must be among them.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        what = "is a file, not a directory" if path.exists() else "no such directory"
        raise MissingFile(f"{name}: {what} (expected a checkpoint directory or a hub name)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with datasets
        raise CheckpointError(f"{name}: not a local directory and huggingface_hub is not installed") from err

    # Without a reachable hub look only in the cache: huggingface_hub would spend ~25 s retrying.
    cache_only = _offline() or not hub_reachable()
    problems = []
    for repo_id in hub_candidates(name):
        snapshot: Path | None = None
        for filename in want:
            if snapshot is not None and filename in WEIGHT_FILES and weights_present(snapshot):
                continue  # safetensors found: do not fetch the .bin as well
            try:
                snapshot = Path(hf_hub_download(repo_id, filename, local_files_only=cache_only)).parent
            except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as err:
                problems.append(f"{repo_id}/{filename}: {type(err).__name__}")
                if isinstance(err, LocalEntryNotFoundError) and not cache_only:
                    cache_only = True  # the hub did not answer and the cache does not have it
                if isinstance(err, RepositoryNotFoundError) or filename in required:
                    break
            except Exception as err:  # gated repo, HTTP errors...
                problems.append(f"{repo_id}/{filename}: {type(err).__name__}: {str(err).splitlines()[0]}")
                break
        if snapshot is not None and all((snapshot / f).exists() for f in required):
            return snapshot
    offline = _offline()
    reason = "HF_HUB_OFFLINE is set" if offline else (
        "not in the cache, and the hub is not reachable" if not hub_reachable()
        else "no such repo, or no network")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    raise CheckpointError(
        f"could not find {name!r} locally or on the Hugging Face hub "
        f"({reason}; cache: {cache}).\n"
        f"Point at a local directory in the transformers layout instead "
        f"(config.json + model.safetensors or pytorch_model.bin), or fill the cache where a network exists "
        f"(`hf download {hub_candidates(name)[-1]}`).\nTried: " + "; ".join(problems[:8]))


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint's directory; from the hub, a sharded checkpoint's shards (named by its index) too."""
    directory = resolve(name_or_path, want=(CONFIG_NAME,) + WEIGHT_FILES, required=(CONFIG_NAME,))
    try:
        files = weights_files(directory)
    except CheckpointError:
        return directory  # load_weights says what is missing
    missing = tuple(file.name for file in files if not file.exists())
    if missing and not Path(name_or_path).expanduser().is_dir():
        directory = resolve(name_or_path, want=missing, required=missing)
    return directory


# -- reading weights ------------------------------------------------------------------------------
def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"weights file missing: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except CheckpointError:
        raise
    except Exception as err:
        hint = ""
        if path.suffix != ".safetensors" and "weights_only" in str(err):
            hint = " (the file holds pickled objects other than tensors; refusing to unpickle code)"
        raise CheckpointError(f"cannot read weights file {path}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from err


def weights_files(directory: Path) -> list[Path]:
    """The weight file(s) of a checkpoint directory, safetensors preferred."""
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (directory / single).exists():
            return [directory / single]
        if (directory / index).exists():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{directory / index}: not a valid shard index ({err})") from None
            return [directory / shard for shard in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def read_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory, and for each key the file it came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in weights_files(directory):
        part = _read_one(file)
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{file}: expected a mapping of names to tensors")
        for key, value in part.items():
            tensors[key] = value
            origin[key] = file
    return tensors, origin


def normalize_keys(model: CausalLM, tensors: dict[str, torch.Tensor], origin: dict[str, Path]):
    """Map checkpoint keys onto the model's: add the base model's prefix (``transformer.`` or
    ``model.``) where the file was saved from the base model, drop legacy buffers, and drop
    ``lm_head.weight`` when the head is tied (it is the token embedding)."""
    out: dict[str, torch.Tensor] = {}
    out_origin: dict[str, Path] = {}
    tied = model.lm_head is None
    prefix = model.base_model_prefix + "."
    for key, value in tensors.items():
        bare = key.removeprefix(prefix)
        if _LEGACY_BUFFER.match(bare):
            continue
        if key == "lm_head.weight":
            if tied:
                continue
            new_key = key
        else:
            new_key = prefix + bare
        out[new_key] = value
        out_origin[new_key] = origin[key]
    return out, out_origin


def load_weights(model: CausalLM, directory: Path) -> None:
    """Copy a checkpoint into ``model``: every key must exist on both sides with the same shape."""
    tensors, origin = read_state_dict(directory)
    tensors, origin = normalize_keys(model, tensors, origin)
    expected = model.checkpoint_state_dict()  # vocabulary rows without pad_vocab's padding
    files = sorted({str(p) for p in origin.values()}) or [str(directory)]
    problems = []
    for key in expected.keys() - tensors.keys():
        problems.append(f"missing key {key} (expected shape {tuple(expected[key].shape)}) "
                        f"in {', '.join(files)}")
    for key in tensors.keys() - expected.keys():
        problems.append(f"unexpected key {key} (shape {tuple(tensors[key].shape)}) in {origin[key]}")
    for key in tensors.keys() & expected.keys():
        if tensors[key].shape != expected[key].shape:
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(tensors[key].shape)} "
                            f"in {origin[key]}, model expects {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match the model config:\n  "
                              + "\n  ".join(sorted(problems)))
    # A model built on the meta device takes the loaded tensors as its parameters; a real one
    # is copied into in place, so an optimizer holding its parameters stays attached.
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_checkpoint_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, assign=on_meta)


def check_finite(model: CausalLM, directory: Path) -> None:
    """Refuse weights holding NaN or inf: every prediction from them would be NaN (and a
    fine-tune from them could not recover)."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{directory}: the weights hold NaN/inf values ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}) — the training that wrote them diverged; "
                              f"use an earlier checkpoint")


def from_pretrained(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, **config_overrides) -> CausalLM:
    """Load a checkpoint of any supported ``model_type`` (local directory or hub name) in eval mode.

    ``dtype``: the weights' dtype (default float32). Each tensor is converted once, from the file's
    dtype straight to this one: a bf16 checkpoint loaded with ``dtype=torch.bfloat16`` never has a
    float32 copy in memory. ``config_overrides`` replace config.json fields (e.g. ``resid_pdrop=0.0``).
    A folder holding a LoRA adapter (``adapter_config.json``, no weights) loads as the base it names
    with the adapter merged in (``lora.peft_format.load_adapted_model``).
    """
    from .lora.peft_format import is_adapter_folder, load_adapted_model  # lora reads weights through hub

    if is_adapter_folder(name_or_path):  # a LoRA run's model folder (or peft's): its base plus the adapter
        return load_adapted_model(name_or_path, dtype=dtype, device=device, **config_overrides)
    directory = resolve_checkpoint(name_or_path)
    config = config_from_json_file(directory / CONFIG_NAME)
    architectures = config.extra.get("architectures") or []
    if any("SequenceClassification" in str(a) for a in architectures):
        raise CheckpointError(f"{directory} holds a {architectures[0]} (a reward model, minift reward's), "
                              "not a language model — give a model folder of minift train or minift dpo, or "
                              f"score with this one: minift score PROMPT --model {directory}")
    if config_overrides:
        config = config.replace(**config_overrides)
    with torch.device("meta"):
        model = build_model(config)
    if dtype is not None:
        model.to(dtype=dtype)  # on the meta device: only what load_weights converts to
    load_weights(model, directory)
    check_finite(model, directory)
    model.eval()
    if device is not None:
        model.to(device=device)
    return model
