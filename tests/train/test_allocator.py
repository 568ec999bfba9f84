"""Keeping freed memory for reuse: applied once through glibc, and by every training run."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from lorakit.config import TrainConfig
from lorakit.train import allocator, loop
from tests.helpers import char_tokenizer
from tests.train.test_loop import adapter_model, copy_examples


@pytest.mark.skipif(platform.system() != "Linux" or "glibc" not in " ".join(platform.libc_ver()),
                    reason="mallopt is glibc's")
def test_glibc_takes_the_settings():
    assert allocator.reuse_freed_memory() is True


def test_without_a_c_library_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    allocator.reuse_freed_memory.cache_clear()
    try:
        assert allocator.reuse_freed_memory() is False
    finally:
        allocator.reuse_freed_memory.cache_clear()


def test_training_applies_it(monkeypatch):
    called = []
    monkeypatch.setattr(loop, "reuse_freed_memory", lambda: called.append(True))
    loop.train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2), progress=False)
    assert called == [True]
