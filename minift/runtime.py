"""Process set-up for a run: seeds, device, threads, the CPU allocator setting, the stop
signal, moving batches to the device ahead of the step, peak memory, and the DataLoader workers'
set-up (they die with the run). The recipe calls ``setup_process`` once; nothing here knows about
models or data.

``keep_large_allocations``: glibc serves allocations above its mmap threshold (at most 32 MiB)
with fresh ``mmap`` pages and returns them on free, so every training step page-faults its large
buffers anew: the tied embedding's gradient (vocab x width, 124 MB for openai-gpt), the logits of
the labelled rows, the LM-head gradient. Raising the mmap and trim thresholds keeps those buffers
on the heap for reuse: +20-25 % real tokens/s on a 2-core CPU (benchmarks/RESULTS.md). Peak memory
is unchanged; memory freed after the peak is not returned to the OS until the process ends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import signal
import sys
from typing import Any, Iterator

import numpy as np
import torch

from .errors import InputError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as torch spells it, refused (one line,
    ``InputError``) when this machine does not have it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"train.device {name!r} is not a device: \"auto\", \"cpu\", \"cuda\", \"cuda:1\" "
                         "...") from None
    check_device_present(device)
    return device


def check_device_present(device: torch.device) -> None:
    """Refuse a device this machine lacks before a tensor is moved to it."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"train.device = \"{device}\", but this machine has no CUDA device (torch "
                             f"{torch.__version__}, CUDA "
                             f"{'built in' if torch.backends.cuda.is_built() else 'not built in'}) — use "
                             "train.device = \"auto\" or \"cpu\"")
        if device.index is not None and device.index >= count:
            raise InputError(f"train.device = \"{device}\", but this machine has {count} CUDA device(s): "
                             f"cuda:0 .. cuda:{count - 1}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"train.device = \"{device}\", but MPS is not available here — use \"auto\" or "
                         "\"cpu\"")
    elif device.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, device.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise InputError(f"train.device = \"{device}\": no {device.type} device is available here — use "
                             "\"auto\" or \"cpu\"")


def setup_process(seed: int, device: torch.device, threads: int = 0, keep_allocations: bool = True) -> None:
    """Seed every RNG, set torch's thread count (0 = leave it) and, on CPU, the allocator setting."""
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    if keep_allocations and device.type == "cpu":
        keep_large_allocations()


def keep_large_allocations(threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds (Linux only; a no-op returning False elsewhere)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold - 1))
    return _applied


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init_loader_worker(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader minift builds (``functools.partial(init_loader_worker,
    os.getpid())``). A worker leaves SIGINT and SIGTERM to the training process, which stops at the
    next step boundary and then shuts its workers down; and it dies with that process however it
    dies (Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so a SIGKILLed run leaves no orphan worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # another libc: the DataLoader's own watchdog remains
            pass
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


def to_device(window: list[dict], device: torch.device) -> list[dict]:
    """The window's tensors on ``device`` (non-blocking from pinned memory); counts stay Python ints."""
    if device.type == "cpu":
        return window
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            for b in window]


def prefetched(windows: Iterator[list[dict]], device: torch.device) -> Iterator[list[dict]]:
    """Windows moved to the device one step ahead: while step k runs, step k+1's batches are
    collated and copied on a side stream (CUDA), so the input pipeline is off the critical path."""
    if device.type != "cuda":
        yield from windows
        return
    copy_stream = torch.cuda.Stream(device)
    ahead = None
    for window in windows:
        with torch.cuda.stream(copy_stream):
            moved = to_device(window, device)
        if ahead is not None:
            yield ahead
        torch.cuda.current_stream(device).wait_stream(copy_stream)
        for batch in moved:  # the tensors are used on the compute stream: keep their memory until then
            for value in batch.values():
                if torch.is_tensor(value):
                    value.record_stream(torch.cuda.current_stream(device))
        ahead = moved
    if ahead is not None:
        yield ahead


def high_water_rss() -> int:
    """This process's peak resident set in bytes (VmHWM). Not ``ru_maxrss``: Linux carries that
    across fork + exec, so a child started by a 4 GB parent would report at least 4 GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated tensor memory on CUDA; this process's peak resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return high_water_rss()
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary.
    A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.signal_name is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
