"""Atomic checkpoints of the whole training state, and resume.

A checkpoint directory ``checkpoint-<step>`` holds:

    config.json, model.safetensors   the model in the transformers layout (save_pretrained)
    training_state.pt                optimizer, scheduler, GradScaler, RNG states, sampler
                                     position, step/epoch counters (loaded with weights_only)
    run_config.json                  the minift run config
    manifest.json                    size and sha256 of every file above, written last

A LoRA run writes ``adapter_state.safetensors`` (the tensors that train, under the model's
parameter names) instead of the weights: the frozen base is ``model.name``'s, read again on
resume. An FSDP run writes its sharded model and optimizer state through
``torch.distributed.checkpoint`` (``.metadata`` + one ``__<rank>_0.distcp`` per rank, every rank
writing into the same temporary folder; ``fsdp.py``); ``training_state.pt`` then holds the rest.

It is written into ``.tmp-checkpoint-<step>-<pid>``; each file and the directory are
fsync'ed, then the directory is renamed into place. Resume accepts only directories whose
manifest matches their files, so a run killed mid-write leaves nothing resume would take;
older checkpoints are pruned only after the new one is complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import MiniftError, MissingFile, ResumeRefused
from .hub import load_weights
from .lora import holds_adapter, load_adapter_state_dict, trainable_parameters
from .models.base import CONFIG_NAME, WEIGHTS_NAME

MANIFEST = "manifest.json"
STATE_FILE = "training_state.pt"
RUN_CONFIG = "run_config.json"
ADAPTER_STATE = "adapter_state.safetensors"  # LoRA: what trains, under the model's parameter names
SHARDED_INDEX = ".metadata"  # FSDP: torch.distributed.checkpoint's index of the shard files
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointCorrupt(MiniftError, RuntimeError):
    """A checkpoint whose files do not match its manifest (exit 2)."""

    exit_code = 2


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
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


def temporary_dir_for(final: Path) -> Path:
    """The temporary sibling ``write_dir_atomically`` fills before renaming it to ``final``."""
    return final.parent / f".tmp-{final.name}-{os.getpid()}"


def write_dir_atomically(final: Path, write: Callable[[Path], None], filled: Path | None = None) -> Path:
    """Fill a temporary sibling of ``final`` with ``write(tmp)``, fsync every file and the
    directory, then rename it into place: ``final`` is either the old or the complete new one.
    A failed write removes the temporary directory and leaves ``final`` untouched. ``filled``: a
    temporary folder other processes have already written into (FSDP's shards), completed here."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = filled or temporary_dir_for(final)
    if tmp.exists() and filled is None:
        shutil.rmtree(tmp)
    try:
        write(tmp)  # creates tmp (save_pretrained does)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if final.exists():  # the same step again (a rerun), or the exported model: swap only now
            _delete(final)
        os.replace(tmp, final)
        _fsync(parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err) is not None and not isinstance(err, OSError):  # said in the words of the OS
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from err
        raise
    return final


def _disk_full(err: BaseException | None) -> BaseException | None:
    """The exception in ``err``'s chain that says the disk is full: torch.save reports it as
    ``RuntimeError: [enforce fail ...] unexpected pos`` with the OSError as its context, and
    safetensors as ``SafetensorError: ... (os error 28)``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "(os error 28)" in str(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def save_checkpoint(output_dir: str | Path, step: int, model, training_state: dict[str, Any],
                    run_config: dict[str, Any], keep: int = 2, tokenizer=None,
                    fingerprints: dict[str, str] | None = None, log: Callable[[str], None] = print,
                    protect: Path | None = None, filled: Path | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically (with the tokenizer's files when given, and the
    run's ``fingerprints`` in the manifest); then keep only the newest ``keep`` verified ones
    (and ``protect``, the best checkpoint: ``prune_checkpoints``). ``filled``: the temporary
    folder FSDP's shards were written into."""
    output_dir = Path(output_dir)

    def write(tmp: Path) -> None:
        save_model_state(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        with open(tmp / STATE_FILE, "wb") as f:  # a file object: a full disk surfaces as OSError ENOSPC
            torch.save(training_state, f)
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: {"bytes": (tmp / name).stat().st_size,
                                                   "sha256": _sha256(tmp / name)} for name in files}}
        if fingerprints:
            manifest["fingerprints"] = dict(fingerprints)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    final = write_dir_atomically(output_dir / f"checkpoint-{step}", write, filled=filled)
    prune_checkpoints(output_dir, keep, log=log, protect=protect)
    return final


def save_model_state(model, directory: Path) -> None:
    """The model part of a checkpoint: with an adapter, the tensors that train (``ADAPTER_STATE``);
    otherwise the whole model (``save_pretrained``). FSDP's shards are written before (``fsdp.py``)."""
    from safetensors.torch import save_file

    if (directory / SHARDED_INDEX).exists():
        return
    if holds_adapter(model):
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in trainable_parameters(model).items()}
        save_file(tensors, str(directory / ADAPTER_STATE), metadata={"format": "pt"})
    else:
        model.save_pretrained(directory)


def load_model_state(model, path: Path, load_model_weights: Callable[[Any, Path], None] = load_weights
                     ) -> None:
    """What ``save_model_state`` wrote, into ``model`` (in place): the adapter's tensors (strict by
    name and shape), or the whole weights through ``load_model_weights``."""
    if (path / ADAPTER_STATE).exists():
        from safetensors.torch import load_file

        load_adapter_state_dict(model, load_file(str(path / ADAPTER_STATE)), source=str(path / ADAPTER_STATE))
    else:
        load_model_weights(model, path)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, its schema checked: ``files`` maps plain file names
    to ``{"bytes": int, "sha256": str}``; ``fingerprints`` (optional) maps names to strings."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointCorrupt(f"{path}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest (no 'files' object)")
    for name, entry in files.items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest "
                                    f"(file name {name!r} is not a plain name)")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int
                and isinstance(entry.get("sha256"), str)):
            raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest (files[{name!r}] must be "
                                    f"{{\"bytes\": int, \"sha256\": str}}, got {entry!r})")
    fingerprints = manifest.get("fingerprints", {})
    if not (isinstance(fingerprints, dict) and all(isinstance(v, str) for v in fingerprints.values())):
        raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest "
                                f"(fingerprints must map names to strings)")
    return manifest


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointCorrupt naming the file and the reason unless ``path`` is complete."""
    files = read_manifest(path)["files"]
    model_files = (ADAPTER_STATE,) if ADAPTER_STATE in files else (SHARDED_INDEX,) if SHARDED_INDEX in files \
        else (CONFIG_NAME, WEIGHTS_NAME)
    for name in (*model_files, STATE_FILE):
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


# A checkpoint verified once is not hashed again while its files keep their sizes and times.
_verified: dict[Path, tuple] = {}


def _verify_cached(path: Path) -> None:
    signature = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()))
    if _verified.get(path) != signature:
        verify_checkpoint(path)
        _verified[path] = signature


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


def prune_checkpoints(output_dir: Path, keep: int, log: Callable[[str], None] = print,
                      protect: Path | None = None) -> None:
    """Keep the newest ``keep`` *verified* checkpoints (so never the last good one), and
    ``protect`` (the best checkpoint) besides the newest, as Trainer's ``rotate_checkpoints``: the
    oldest others go until ``max(keep, protected)`` remain. A ``checkpoint-*`` without a manifest
    is what a killed deletion leaves (writes appear only complete): it is finished off. One whose
    files fail verification is moved to ``corrupt-<name>-<n>``, kept for inspection and no longer
    counted."""
    for leftover in output_dir.glob(".deleting-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    good = []
    for path in list_checkpoints(output_dir):
        try:
            _verify_cached(path)
            good.append(path)
        except CheckpointCorrupt as err:
            if not (path / MANIFEST).exists():
                _delete(path)
                continue
            n = 1 + sum(1 for _ in output_dir.glob(f"corrupt-{path.name}-*"))
            os.replace(path, output_dir / f"corrupt-{path.name}-{n}")
            log(f"moved aside: {err} -> {output_dir / f'corrupt-{path.name}-{n}'}")
    names = [path.name for path in good]
    protected = set(names[:1]) | ({protect.name} & set(names) if protect is not None else set())
    remaining = len(good)
    for old in reversed(good):  # oldest first
        if remaining <= max(keep, len(protected)):
            break
        if old.name not in protected:
            _delete(old)
            remaining -= 1
    for leftover in output_dir.glob(".tmp-checkpoint-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _delete(path: Path) -> None:
    """Rename, then remove: a kill mid-way leaves a ``.deleting-*`` folder the next prune
    finishes off, never a ``checkpoint-*`` that looks like a checkpoint."""
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    _verified.pop(path, None)
    shutil.rmtree(doomed, ignore_errors=True)


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
    (not DDP, not compiled), ``sampler`` minift's batch sampler, ``precision`` holds the scaler;
    ``tokenizer`` (optional) is saved beside the weights so the checkpoint is self-contained."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Any
    sampler: Any
    tokenizer: Any = None
    extra_state: dict[str, Any] | None = None  # a stage's own tensors (e.g. DPO's precomputed reference)
    load_model_weights: Callable[[Any, Path], None] = load_weights  # the reward model has its own layout


def save_training_state(output_dir: str | Path, state, parts: TrainingParts, dist, run_config: dict[str, Any],
                        total_steps: int, keep: int = 2, fingerprints: dict[str, str] | None = None,
                        log: Callable[[str], None] = print, protect: Path | None = None) -> Path | None:
    """Checkpoint step ``state.step``: weights, optimizer, scheduler, scaler, every rank's RNG and
    sampler position, the loop's counters. Every rank must call it (the states are gathered);
    rank 0 writes (and prunes, keeping ``protect``). Returns the checkpoint directory (None on other
    ranks)."""
    rng = dist.gather(rng_state())
    samplers = dist.gather(parts.sampler.state_dict())
    final = Path(output_dir) / f"checkpoint-{state.step}"
    filled = _write_shards(final, parts, dist) if dist.sharded else None
    if not dist.is_main:
        return None
    optimizer = {} if dist.sharded else {"optimizer": parts.optimizer.state_dict()}  # FSDP: in the shards
    training_state = {**optimizer, "scheduler": parts.scheduler.state_dict(),
                      "precision": parts.precision.state_dict(), "rng": rng, "sampler": samplers,
                      "train_state": state.state_dict(), "total_steps": total_steps,
                      "world_size": dist.world_size, "sharded": dist.sharded, **(parts.extra_state or {})}
    return save_checkpoint(output_dir, state.step, parts.model, training_state, run_config, keep=keep,
                           tokenizer=parts.tokenizer, fingerprints=fingerprints, log=log, protect=protect,
                           filled=filled)


def _write_shards(final: Path, parts: TrainingParts, dist) -> Path:
    """FSDP: every rank writes its shards of the model and optimizer into rank 0's temporary folder
    for ``final`` (collective); returns that folder, which rank 0 then completes and renames."""
    from .fsdp import save_state

    tmp = dist.broadcast(temporary_dir_for(final) if dist.is_main else None)
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_state(tmp, parts.model, parts.optimizer, trained_only=holds_adapter(parts.model))
    dist.barrier()
    return tmp


def restore_training_state(path: Path, state, parts: TrainingParts, dist,
                           keep_new_hyperparameters: bool = False) -> None:
    """Load what ``save_training_state`` wrote into ``parts`` and ``state`` (this rank's sampler
    position and RNG; a stage's ``extra_state`` tensors are overwritten in place). Refuses a checkpoint
    written by another number of ranks. ``keep_new_hyperparameters``: the optimizer's lr, betas,
    eps and weight decay and the schedule stay this run's (loading a state dict would bring back
    the checkpoint's)."""
    saved = load_training_state(path)
    dist.check_world_size(saved.get("world_size", 1))
    _check_sharding(path, bool(saved.get("sharded")), dist.sharded)
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in parts.optimizer.param_groups]
    if dist.sharded:
        from .fsdp import load_state

        load_state(path, parts.model, parts.optimizer, trained_only=holds_adapter(parts.model))
    else:
        device = next(parts.model.parameters()).device
        load_model_state(parts.model, path, parts.load_model_weights)
        parts.model.to(device)
        parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if keep_new_hyperparameters:
        _reapply_hyperparameters(parts.optimizer, parts.scheduler, fresh)
    parts.precision.load_state_dict(saved["precision"])
    parts.sampler.load_state_dict(saved["sampler"][dist.rank], allow_changes=keep_new_hyperparameters)
    state.load_state_dict(saved["train_state"])
    set_rng_state(saved["rng"][dist.rank])
    for key, value in (parts.extra_state or {}).items():  # a stage's own entries: tensors restored in place
        if key in saved:
            if not torch.is_tensor(value) or value.shape != saved[key].shape:
                raise ResumeRefused(f"{path}: {key} has shape {tuple(saved[key].shape)}, this run's "
                                    f"{tuple(getattr(value, 'shape', ()))} — resume with the same data")
            value.copy_(saved[key])


def _check_sharding(path: Path, saved_sharded: bool, sharded: bool) -> None:
    if saved_sharded != sharded:
        written = "sharded by FSDP" if saved_sharded else "whole (one process or DDP)"
        wanted = "train.distributed = \"fsdp\" under torchrun" if saved_sharded else \
            "train.distributed = \"ddp\" (or one process)"
        raise ResumeRefused(f"{path} holds the model {written}; resume it with {wanted}")


def _reapply_hyperparameters(optimizer, scheduler, fresh: list[dict[str, Any]]) -> None:
    """This run's hyperparameters over the restored optimizer state; the lr recomputed from this
    run's schedule at the restored step (LambdaLR's own formula: base lr x multiplier)."""
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def checkpoint_to_resume(resume: str | Path | bool, output_dir: str | Path,
                         log: Callable[[str], None] = print) -> Path | None:
    """``resume=True``: the newest intact checkpoint in ``output_dir`` (None when there is none);
    a path: that checkpoint, verified."""
    if resume is True:
        return find_resumable(output_dir, log=log)
    path = Path(resume)
    if not path.is_dir():
        raise MissingFile(f"--resume {path}: no such checkpoint directory — give a checkpoint-<step> folder, "
                          f"or --resume alone for the newest intact one in train.output_dir")
    verify_checkpoint(path)
    return path


# -- resume refuses what it cannot honour ------------------------------------------------------------
# Settings that may differ on resume: where and how often things are written, shown or evaluated,
# and how the same maths is run. Every other setting changes the training and is compared.
FREE_ON_RESUME = {"train.output_dir", "train.device", "train.threads", "train.keep_large_allocations",
                  "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.on_nonfinite", "train.progress", "train.plot", "train.logging_first_step",
                  "data.num_workers", "data.eval_split",
                  "model.compile", "model.activation_checkpointing", "train.check_memory"}


def fingerprints(tokenizer, train_rows: Iterable) -> dict[str, str]:
    """sha256 of what the training sees besides the config: the tokenizer (its serialized vocabulary,
    merges and special tokens) and the tokenized training data (each row JSON-encoded, in order:
    for fine-tuning (ids, prompt length), for pairs (prompt, chosen, rejected ids))."""
    tok = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8"))
    tok.update(json.dumps([tokenizer.pad_token, tokenizer.eos_token]).encode())
    data = hashlib.sha256()
    for row in train_rows:
        data.update(json.dumps(list(row)).encode())
    return {"tokenizer": tok.hexdigest(), "train_data": data.hexdigest()}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and not (prefix == "model." and key == "config"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def same_setting(old: Any, new: Any) -> bool:
    """Equal values; a yes/no option saved as true/false by an older minift equals "yes"/"no"."""
    def spelled(value: Any) -> Any:
        return {True: "yes", False: "no"}[value] if isinstance(value, bool) else value

    return spelled(old) == spelled(new)


def resume_differences(path: Path, run_config: dict[str, Any], run_fingerprints: dict[str, str]
                       ) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint's value, this run's) for every setting that changes the maths (the
    world size is checked apart: no flag can resume on another number of ranks)."""
    from .config import RunConfig

    saved = json.loads((path / RUN_CONFIG).read_text(encoding="utf-8"))
    old, new = _flatten(saved), _flatten(run_config)
    defaults = _flatten(RunConfig().to_dict())  # a setting newer than the checkpoint, at its default: same
    rows = [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in FREE_ON_RESUME and not key.startswith("eval.")
            and not same_setting(old.get(key), new.get(key))
            and not (key not in old and key in defaults and same_setting(defaults[key], new.get(key)))]
    saved_prints = read_manifest(path).get("fingerprints", {})
    for name, value in run_fingerprints.items():
        if name in saved_prints and saved_prints[name] != value:
            rows.append((f"{name} sha256", saved_prints[name][:12], value[:12]))
    return rows


def resume_training(resume: str | Path | bool, output_dir: str | Path, state, parts: TrainingParts, dist,
                    run_config: dict[str, Any], run_fingerprints: dict[str, str], allow_changes: bool = False,
                    log: Callable[[str], None] = print) -> Path | None:
    """Find the checkpoint to resume from and load it, refusing (``ResumeRefused``, with a table
    of old and new values) when a setting that changes the maths differs, unless
    ``allow_changes``: then the new values are used and the next checkpoint records them."""
    path = checkpoint_to_resume(resume, output_dir, log=log)
    if path is None:
        log(f"resume: no complete checkpoint in {output_dir}; starting from scratch")
        return None
    dist.check_world_size(load_training_state(path).get("world_size", 1))
    rows = resume_differences(path, run_config, run_fingerprints)
    changes = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in rows)  # checkpoint -> this run
    if rows and not allow_changes:
        raise ResumeRefused(f"{path} was written with other settings (checkpoint -> this run: {changes}); "
                            "resume with the checkpoint's settings, or pass --resume-with-changes to go on "
                            "with the new ones (they are recorded in the next checkpoint's run_config.json)")
    if rows:
        log(f"resume with changes (checkpoint -> this run): {changes}")
    restore_training_state(path, state, parts, dist, keep_new_hyperparameters=bool(rows))
    log(f"resume: {path} (step {state.step}, epoch {parts.sampler.epoch}, batch {parts.sampler.consumed})")
    return path
