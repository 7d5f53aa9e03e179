"""The output folder of a run: one owner at a time, and no run silently written over another.

``claim_output_dir`` is entered before anything is written into ``train.output_dir``:

- an advisory lock (``fcntl.flock`` on ``<output_dir>/.minift.lock``, holding the owner's pid)
  is taken for the whole run; a second run on the same folder refuses at once, naming that pid.
  The kernel drops the lock when the owner exits, however it exits (a kill -9 included);
- a fresh run (no ``--resume``) into a folder that holds another run's output refuses, unless
  ``overwrite``: then the old run is *moved aside* to ``<output_dir>.previous-<n>`` (never
  deleted), and the new run starts in an empty folder.

Advisory locks bind only programs that take them (other minift runs); on network file systems
without ``flock`` support the lock may not hold across machines.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import InputError

LOCK_FILE = ".minift.lock"
# What a run leaves in its folder; the synthetic material (``synthetic/``) is input, not output.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "model", "curves.png", "checkpoint-*", "corrupt-*")


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


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool = False, enabled: bool = True,
                     log=print) -> Iterator[Path]:
    """Hold ``output_dir`` for the duration of the ``with`` block (see the module docstring).
    ``enabled=False`` (ranks other than 0) claims nothing: rank 0 holds the folder for all."""
    output_dir = Path(output_dir)
    if not enabled:
        yield output_dir
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputDirBusy(f"{output_dir} is in use by another minift run (pid {holder}) — wait for it to "
                                f"finish, or set train.output_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        found = previous_run_files(output_dir)
        if found and not resume:
            if not overwrite:
                shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
                raise InputError(f"{output_dir} holds another run ({shown}) — continue it with --resume, "
                                 f"start afresh with --overwrite (the old run is moved to "
                                 f"{output_dir.name}.previous-N), or set train.output_dir to another folder")
            log(f"overwrite: the previous run in {output_dir} moved to {move_aside(output_dir)}")
        yield output_dir
    finally:
        os.close(fd)  # closing the descriptor releases the lock
