"""Keep freed activation memory in the process for the next training step (glibc's ``mallopt``).

By default glibc hands every allocation above a (dynamic) threshold straight to ``mmap`` and returns it
to the operating system on free, so each training step maps its activations afresh and pays a page
fault per 4 KiB page on first touch: on the default model about 5-8% of a CPU training step. Raising
the ``mmap`` threshold to its ceiling (32 MiB) and the trim threshold to 1 GiB lets freed blocks be
reused from the heap instead. The cost: the process keeps up to that much freed memory instead of
returning it. CUDA memory is not affected (PyTorch caches it already).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_CEILING = 32 << 20
TRIM_THRESHOLD = 1 << 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Apply the settings above once per process; whether they took effect (False without glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
