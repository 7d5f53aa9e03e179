"""The output folder of a run: one owner at a time, and no run silently written over another.

``claim_output_dir`` is entered before anything is written into ``train.output_dir``:

- an advisory lock (``fcntl.flock`` on ``<output_dir>/.minift.lock``, holding the owner's pid)
  is taken for the whole run; a second run on the same folder refuses at once, naming that pid.
  The kernel drops the lock when the owner exits, however it exits (a kill -9 included);
- a fresh run (no ``--resume``) into a folder that holds another run's output refuses, unless
  ``overwrite``: then the old run is *moved aside* to ``<output_dir>.previous-<n>`` (never
  deleted), and the new run starts in an empty folder. Before anything moves, the run's inputs are
  checked: a local input that does not exist, or one inside the folder that would move (a model
  in ``<output_dir>/model``), is refused; so is a folder holding files that are not a run's;
- an ``output_dir`` that is a file or a dangling symbolic link is refused in one line, and a
  folder the claim created is removed again when the run fails before writing anything into it.

Advisory locks bind only programs that take them (other minift runs); on network file systems
without ``flock`` support the lock may not hold across machines.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from .errors import InputError, MissingFile

LOCK_FILE = ".minift.lock"
# What a run leaves in its folder; the synthetic material (``synthetic/``) is input, not output.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "model", "curves.png", "checkpoint-*", "corrupt-*")
# Everything a run may write there (what --overwrite may move aside): outputs, its own input, its temporaries.
RUN_ENTRIES = (*RUN_OUTPUTS, "synthetic", "tensorboard", LOCK_FILE, ".tmp-*", ".deleting-*",
               ".metrics.jsonl*", ".summary.json*")


class OutputDirBusy(InputError):
    """Another run holds the output folder (exit 2)."""


def previous_run_files(output_dir: Path) -> list[Path]:
    """The outputs of an earlier run in ``output_dir`` (empty when there are none)."""
    return sorted(p for pattern in RUN_OUTPUTS for p in output_dir.glob(pattern))


def move_aside(output_dir: Path) -> Path:
    """Move every entry of ``output_dir`` but the lock to ``<output_dir>.previous-<n>``."""
    n = 1
    while (aside := output_dir.with_name(f"{output_dir.name}.previous-{n}")).exists():
        n += 1
    aside.mkdir()
    for entry in output_dir.iterdir():
        if entry.name != LOCK_FILE:
            os.replace(entry, aside / entry.name)
    return aside


def foreign_entries(output_dir: Path) -> list[str]:
    """Entries of ``output_dir`` that no run writes (source files, the user's own folders)."""
    return sorted(p.name for p in output_dir.iterdir()
                  if not any(fnmatch(p.name, pattern) for pattern in RUN_ENTRIES))


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that cannot be a folder: a file, or a link to nothing."""
    if output_dir.is_symlink() and not output_dir.exists():
        raise InputError(f"train.output_dir {output_dir} is a symbolic link to {os.readlink(output_dir)}, "
                         "which does not exist — create that folder, or set train.output_dir to another one")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"train.output_dir {output_dir} is a file, not a folder — set train.output_dir to a "
                         "folder (it is created when missing)")


def check_inputs(inputs: dict[str, str], output_dir: Path, overwrite: bool) -> None:
    """Before anything is created or moved: every local input exists, and none lies inside a folder
    that ``overwrite`` would move aside (``inputs``: setting -> local path)."""
    for setting, value in inputs.items():
        path = Path(value).expanduser()
        if not path.exists():
            raise MissingFile(f"{setting} = {value}: no such file or directory")
        if overwrite and output_dir.is_dir() and path.resolve().is_relative_to(output_dir.resolve()):
            raise InputError(f"{setting} = {value} is inside train.output_dir {output_dir}, which "
                             "--overwrite would move aside — copy it out of that folder first, or set "
                             "train.output_dir to another one")


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool = False, enabled: bool = True,
                     log=print, inputs: dict[str, str] | None = None) -> Iterator[Path]:
    """Hold ``output_dir`` for the duration of the ``with`` block (see the module docstring).
    ``enabled=False`` (ranks other than 0) claims nothing: rank 0 holds the folder for all.
    ``inputs``: the run's local inputs (setting -> path), checked before anything is created or moved."""
    output_dir = Path(output_dir)
    if not enabled:
        yield output_dir
        return
    check_output_dir(output_dir)
    check_inputs(inputs or {}, output_dir, overwrite and not resume)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputDirBusy(f"{output_dir} is in use by another minift run (pid {holder}) — wait for it "
                                f"to finish, or set train.output_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        found = previous_run_files(output_dir)
        if found and not resume:
            name = output_dir.resolve().name
            if not overwrite:
                shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
                raise InputError(f"{output_dir} holds another run ({shown}) — continue it with --resume, "
                                 "start afresh with --overwrite (the old run is moved to "
                                 f"{name}.previous-N), or set train.output_dir to another folder")
            if foreign := foreign_entries(output_dir):
                shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
                raise InputError(f"{output_dir} holds files no run writes ({shown}) beside the previous run: "
                                 "--overwrite moves a run's own folder aside, not these — set "
                                 "train.output_dir to a folder of its own")
            log(f"overwrite: the previous run in {output_dir} moved to {move_aside(output_dir.resolve())}")
        yield output_dir
    except BaseException:
        if created and [p.name for p in output_dir.iterdir()] == [LOCK_FILE]:  # nothing written: no folder
            os.unlink(output_dir / LOCK_FILE)
            output_dir.rmdir()
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock
