"""Process-level settings of the hot path on CPU.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and
returns them on free, so every training step page-faults its large buffers anew: the tied
embedding's gradient (vocab x width, 124 MB for openai-gpt), the logits of the labelled rows,
the LM-head gradient. ``keep_large_allocations`` raises the mmap and trim thresholds so those
buffers are reused from the heap. Measured +20-25 % real tokens/s on the 2-core dev machine
(benchmarks/RESULTS.md). Peak memory is unchanged; memory freed after the peak is not returned
to the OS until the process ends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


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
