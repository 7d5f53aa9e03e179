"""Atomic checkpoints of the whole training state, and resume.

A checkpoint directory ``checkpoint-<step>`` holds:

    config.json, model.safetensors   the model in the transformers layout (save_pretrained)
    training_state.pt                optimizer, scheduler, GradScaler, RNG states, sampler
                                     position, step/epoch counters (loaded with weights_only)
    run_config.json                  the minift run config
    manifest.json                    size and sha256 of every file above, written last

It is written into ``.tmp-checkpoint-<step>-<pid>``; each file and the directory are
fsync'ed, then the directory is renamed into place. Resume accepts only directories whose
manifest matches their files, so a run killed mid-write leaves nothing resume would take;
older checkpoints are pruned only after the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .hub import load_weights
from .models.base import WEIGHTS_NAME

MANIFEST = "manifest.json"
STATE_FILE = "training_state.pt"
RUN_CONFIG = "run_config.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointCorrupt(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, step: int, model, training_state: dict[str, Any],
                    run_config: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` atomically; then keep only the newest ``keep`` complete ones."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: {"bytes": (tmp / name).stat().st_size,
                                                   "sha256": _sha256(tmp / name)} for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in files + [MANIFEST]:
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # a checkpoint of the same step (a rerun): replace it only now
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(output_dir, keep)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointCorrupt naming the file and the reason unless ``path`` is complete."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointCorrupt(f"{path}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest ({err})") from None
    for name in ("config.json", WEIGHTS_NAME, STATE_FILE):
        if name not in files:
            raise CheckpointCorrupt(f"{path}: manifest does not list {name}")
    for name, expected in files.items():
        file = path / name
        if not file.exists():
            raise CheckpointCorrupt(f"{file}: missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointCorrupt(f"{file}: {size} bytes, manifest says {expected['bytes']} (truncated?)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointCorrupt(f"{file}: sha256 does not match the manifest")


def find_resumable(output_dir: str | Path, log=print) -> Path | None:
    """The newest complete checkpoint; incomplete or corrupt ones are reported and skipped."""
    for path in list_checkpoints(output_dir):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointCorrupt as err:
            log(f"skipping checkpoint: {err}")
    return None


def load_training_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    complete = []
    for path in list_checkpoints(output_dir):
        if (path / MANIFEST).exists():
            complete.append(path)
    for old in complete[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in output_dir.glob(".tmp-checkpoint-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the training state: what a checkpoint holds beyond the weights, written and read here only --
@dataclass
class TrainingParts:
    """The objects whose state a checkpoint saves and restores. ``model`` is the unwrapped model
    (not DDP, not compiled), ``sampler`` minift's batch sampler, ``precision`` holds the scaler."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Any
    sampler: Any
    extra_state: dict[str, Any] | None = None  # a recipe's own entries (e.g. DPO's precomputed reference)
    load_model_weights: Callable[[Any, Path], None] = load_weights  # the reward model has its own layout


def save_training_state(output_dir: str | Path, state, parts: TrainingParts, dist, run_config: dict[str, Any],
                        total_steps: int, keep: int = 2) -> Path | None:
    """Checkpoint step ``state.step``: weights, optimizer, scheduler, scaler, every rank's RNG and
    sampler position, the loop's counters. Every rank must call it (the states are gathered);
    rank 0 writes. Returns the checkpoint directory (None on other ranks)."""
    rng = dist.gather(rng_state())
    samplers = dist.gather(parts.sampler.state_dict())
    if not dist.is_main:
        return None
    training_state = {"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                      "precision": parts.precision.state_dict(), "rng": rng, "sampler": samplers,
                      "train_state": state.state_dict(), "total_steps": total_steps, "world_size": dist.world_size,
                      **(parts.extra_state or {})}
    return save_checkpoint(output_dir, state.step, parts.model, training_state, run_config, keep=keep)


def restore_training_state(path: Path, state, parts: TrainingParts, dist) -> dict[str, Any]:
    """Load what ``save_training_state`` wrote into ``parts`` and ``state`` (this rank's sampler
    position and RNG); returns the saved dict (a recipe reads its ``extra_state`` entries from it).
    Refuses a checkpoint written by another number of ranks."""
    saved = load_training_state(path)
    dist.check_world_size(saved.get("world_size", 1))
    device = next(parts.model.parameters()).device
    parts.load_model_weights(parts.model, path)
    parts.model.to(device)
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    parts.precision.load_state_dict(saved["precision"])
    parts.sampler.load_state_dict(saved["sampler"][dist.rank])
    state.load_state_dict(saved["train_state"])
    set_rng_state(saved["rng"][dist.rank])
    return saved


def checkpoint_to_resume(resume: str | Path | bool, output_dir: str | Path,
                         log: Callable[[str], None] = print) -> Path | None:
    """``resume=True``: the newest intact checkpoint in ``output_dir`` (None when there is none);
    a path: that checkpoint, verified."""
    if resume is True:
        return find_resumable(output_dir, log=log)
    path = Path(resume)
    verify_checkpoint(path)
    return path
