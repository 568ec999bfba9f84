"""Keeping freed memory for reuse: it takes effect inside the block and during training when asked for, and
the process's settings are back once the block (or ``train()``) ends.

Observed through glibc itself, in a fresh process (whose heap holds no large free block yet): whether a
fresh 16 MiB ``malloc`` is served by its own ``mmap`` (glibc's default above 128 KiB: ``mallinfo2().hblkhd``
grows by it) or from the heap (below the 32 MiB threshold the block sets)."""

from __future__ import annotations

import ctypes.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.train import allocator

GLIBC = platform.system() == "Linux" and "glibc" in " ".join(platform.libc_ver())
ROOT = Path(__file__).resolve().parents[2]

PROBE = '''
import ctypes, ctypes.util, json
from lorakit.train.allocator import freed_memory_kept

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
# glibc's default threshold, pinned: unpinned, glibc raises it to the size of each mapped block freed, the
# probe's own among them
libc.mallopt(-3, 128 << 10)

def mapped(size=16 << 20):
    before = libc.mallinfo2().hblkhd
    pointer = libc.malloc(size)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(pointer)
    return grown >= size
'''


def probe(body: str) -> dict:
    """Run ``body`` after :data:`PROBE` in a fresh Python; it prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", PROBE + body], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")


@needs_glibc
def test_inside_the_block_freed_memory_is_reused_and_afterwards_the_settings_are_back():
    seen = probe('''
before = mapped()
with freed_memory_kept() as applied:
    inside = mapped()
with freed_memory_kept(False) as disabled:
    off = mapped()
print(json.dumps({"before": before, "applied": applied, "inside": inside, "after": mapped(),
                  "disabled": disabled, "off": off}))
''')
    assert seen == {"before": True, "applied": True, "inside": False, "after": True, "disabled": False, "off": True}


@needs_glibc
@pytest.mark.parametrize("keep", [True, False])
def test_training_keeps_freed_memory_only_when_configured_and_only_while_it_runs(keep):
    seen = probe(f'''
from lorakit.config import TrainConfig
from lorakit.methods.component import TrainingComponent
from lorakit.train.loop import train
from tests.helpers import adapter_model, char_tokenizer, copy_examples

class SeesTheAllocator(TrainingComponent):
    mapped_per_step = []
    def before_step(self, step, total):
        self.mapped_per_step.append(mapped())

config = TrainConfig(steps=2, batch_size=2, keep_freed_memory={keep})
train(adapter_model(), char_tokenizer(), copy_examples(4), config, components=[SeesTheAllocator()], progress=False)
print(json.dumps({{"steps": SeesTheAllocator.mapped_per_step, "after": mapped()}}))
''')
    assert seen == {"steps": [not keep, not keep], "after": True}


def test_without_a_c_library_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    allocator._glibc.cache_clear()
    try:
        with allocator.freed_memory_kept() as applied:
            assert applied is False
    finally:
        allocator._glibc.cache_clear()
