"""Handing memory the process has freed back to the operating system (glibc's ``malloc_trim``).

Quantizing a model layer by layer frees many temporaries of a few megabytes between long-lived small results
(the codes); glibc keeps such freed heap memory for reuse instead of returning it, so the process's resident
memory would grow by several hundred megabytes while it quantizes. Trimming after each layer keeps it at what
the model holds. Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the heap's free memory to the operating system, where the C library can (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
