"""One native-heap policy for the whole process: reuse freed memory, and keep it from creeping.

Inference allocates and frees the same large tensors (windows, activations, probabilities) again and again,
from two threads (the window reader and the compute loop). Two glibc defaults hurt that pattern:

* large blocks are served by ``mmap`` and unmapped on free, so every pass page-faults its working set again.
  On the project's VM a page fault costs ~3.6 µs: with 1 MB blocks mapped afresh, 69 GRNet windows spent 123 s
  in the kernel against 3.6 s with reuse (2.6x the wall time), and a CascadePSP cascade ran 2.2x slower;
* the mmap threshold adapts upwards after each large free, and every thread gets its own arena, so the heap
  fragments and the resident size creeps up with the number of windows (``uhrseg segment`` on 20000² peaked
  19 % above 5000² with the defaults).

``tune_native_heap`` fixes the mmap threshold at ``mmap_threshold`` (blocks below it are reused from the heap;
a fixed value also stops the adaptive climb), keeps up to ``trim_threshold`` of free memory at the top of the
heap before returning it, and uses at most ``arenas`` arenas. Freed memory then stays with the process up to
the peak working set, so peak RSS depends on the window, not on the number of windows. It does nothing off
glibc (macOS, Windows, musl), and it leaves alone what the user set with glibc's own environment variables.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h) and the environment variables that set them
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
_ENV = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
        M_ARENA_MAX: "MALLOC_ARENA_MAX"}
_done: bool | None = None


def tune_native_heap(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20, arenas: int = 2) -> bool:
    """Apply the policy once per process; True when it is in force (now or already)."""
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
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
                         (M_ARENA_MAX, arenas)):
        if _ENV[param] not in os.environ:
            ok &= mallopt(param, int(value)) == 1
    _done = bool(ok)
    return _done
