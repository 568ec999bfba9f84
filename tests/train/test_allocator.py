"""Keeping freed memory for reuse: it takes effect inside the block and during training when asked for, and
the process's settings are back once the block (or ``train()``) ends. Observed through glibc itself: whether
a fresh 16 MiB ``malloc`` is served by ``mmap`` (``mallinfo2().hblkhd`` grows) or from the heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from lorakit.config import TrainConfig
from lorakit.methods.component import TrainingComponent
from lorakit.train import allocator
from lorakit.train.loop import train
from tests.helpers import char_tokenizer
from tests.train.test_loop import adapter_model, copy_examples

GLIBC = platform.system() == "Linux" and "glibc" in " ".join(platform.libc_ver())
SIZE = 16 << 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def mapped_by_mmap(size: int = SIZE) -> bool:
    """Whether glibc serves a ``size``-byte allocation with its own ``mmap``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    pointer = libc.malloc(size)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(pointer)
    return grown >= size


@pytest.fixture
def glibc_defaults():
    if not GLIBC:
        pytest.skip("mallopt is glibc's")
    with allocator.freed_memory_kept():
        pass  # leaves the thresholds at their starting values, whatever ran before in this process
    assert mapped_by_mmap()


def test_inside_the_block_freed_memory_is_reused_and_afterwards_the_settings_are_back(glibc_defaults):
    with allocator.freed_memory_kept() as applied:
        assert applied is True
        assert not mapped_by_mmap()
    assert mapped_by_mmap()


def test_disabled_it_changes_nothing(glibc_defaults):
    with allocator.freed_memory_kept(False) as applied:
        assert applied is False
        assert mapped_by_mmap()


def test_without_a_c_library_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    allocator._mallopt.cache_clear()
    try:
        with allocator.freed_memory_kept() as applied:
            assert applied is False
    finally:
        allocator._mallopt.cache_clear()


class SeesTheAllocator(TrainingComponent):
    def __init__(self) -> None:
        self.mmapped: list[bool] = []

    def before_step(self, step: int, total: int) -> None:
        self.mmapped.append(mapped_by_mmap())


@pytest.mark.parametrize("keep", [True, False])
def test_training_keeps_freed_memory_only_when_configured_and_only_while_it_runs(glibc_defaults, keep):
    seen = SeesTheAllocator()
    config = TrainConfig(steps=2, batch_size=2, keep_freed_memory=keep)
    train(adapter_model(), char_tokenizer(), copy_examples(4), config, components=[seen], progress=False)
    assert seen.mmapped == [not keep, not keep]
    assert mapped_by_mmap()
