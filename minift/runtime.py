"""Process set-up for a run: seeds, device, threads, the CPU allocator setting, the stop
signal, moving batches to the device ahead of the step, and peak memory. The recipe calls ``setup_process`` once;
nothing here knows about models or data.

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
import random
import signal
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold - 1))
    return _applied


def to_device(window: list[dict], device: torch.device) -> list[dict]:
    """The window's tensors on ``device`` (non-blocking from pinned memory); counts stay Python ints."""
    if device.type == "cpu":
        return window
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()} for b in window]


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
