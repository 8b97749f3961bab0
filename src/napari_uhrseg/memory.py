"""Keep the native heap of a long run from creeping up window after window.

A whole-image run allocates and frees the same large arrays (windows, probabilities, activations) hundreds of
times, from two threads (the window reader and the compute loop). With glibc's defaults two things make the
resident size grow with the number of windows even though nothing is kept: the mmap threshold adapts upwards
after every large free, so later large arrays come from the heap, where freed holes are rarely returned to
the OS; and each thread gets its own arena. Measured on a 20000 px wide strip of 92 windows (GRNet, G-branch
only), the peak resident size went from 542 MB and rising to 416 MB and flat once both were fixed.

``bound_native_heap`` fixes them for this process: arrays of at least ``mmap_threshold`` bytes are mapped
and unmapped on their own, and at most ``arenas`` arenas are used. It does nothing off glibc (macOS, Windows,
musl), and it leaves alone what the user set with glibc's own environment variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_ARENA_MAX``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc mallopt parameters (malloc.h)
M_ARENA_MAX = -8
_done: bool | None = None


def bound_native_heap(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Apply the two glibc settings once per process; True when they are in force (now or already)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    if "MALLOC_ARENA_MAX" not in os.environ:
        ok &= mallopt(M_ARENA_MAX, int(arenas)) == 1
    _done = bool(ok)
    return _done
