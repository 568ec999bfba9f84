"""Keep freed activation memory in the process for the next training step (glibc's ``mallopt``), while
training only (``TrainConfig.keep_freed_memory``; on for ``lorakit train``).

By default glibc hands every allocation above a (dynamic) threshold straight to ``mmap`` and returns it
to the operating system on free, so each training step maps its activations afresh and pays a page
fault per 4 KiB page on first touch: on the default model about 5-8% of a CPU training step. Raising
the ``mmap`` threshold to its ceiling (32 MiB) and the trim threshold to 1 GiB lets freed blocks be
reused from the heap instead. The cost: the process keeps up to that much freed memory instead of
returning it. CUDA memory is not affected (PyTorch caches it already).

glibc cannot report its current thresholds, so on leaving :func:`freed_memory_kept` they are set back to
what the process started with: the values of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
when the user set those, else glibc's defaults (128 KiB each), and the freed memory the block kept goes
back to the operating system (``malloc_trim``). One difference stays: once a threshold has been set
explicitly, glibc no longer adapts the ``mmap`` threshold to the sizes the program frees.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_CEILING = 32 << 20
TRIM_THRESHOLD = 1 << 30
GLIBC_DEFAULT_THRESHOLD = 128 << 10
"""glibc's starting value of both thresholds."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, with ``mallopt`` and ``malloc_trim`` typed, or None on other C libraries (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _starting_value(variable: str) -> int:
    value = os.environ.get(variable, "")
    return int(value) if value.isdigit() else GLIBC_DEFAULT_THRESHOLD


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the process (see the module docstring); yields whether the
    settings took effect (False when not ``enabled`` or without glibc)."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING))
    applied = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and applied
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, _starting_value("MALLOC_MMAP_THRESHOLD_"))
        libc.mallopt(M_TRIM_THRESHOLD, _starting_value("MALLOC_TRIM_THRESHOLD_"))
        libc.malloc_trim(0)


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the operating system (glibc's ``malloc_trim``; elsewhere nothing):
    after a phase that allocated much more than what follows (LoRAM's pruning and alignment)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
