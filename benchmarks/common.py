"""What the benchmarks share: JSON-line output, a wall-clock timer and random non-zero adapters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import lorakit
from lorakit.core.state import lora_layers


def emit(record: dict) -> None:
    """Print one measurement as a JSON line, at once."""
    print(json.dumps(record), flush=True)


def timed(fn) -> float:
    """Seconds ``fn()`` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def random_adapter(model, config: lorakit.LoraConfig, name: str, root: Path, generator: torch.Generator) -> Path:
    """Attach adapter ``name`` with random non-zero ``A`` and ``B`` (timing needs no training; a zero ``B``
    would let nothing be skipped either, but non-zero values make the logit checks meaningful), save it
    under ``root / name`` in the PEFT format and return that path."""
    lorakit.attach(model, config, name, activate=False, trainable=False)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                adapter = layer.adapters[name]
                adapter.A.copy_(torch.randn(adapter.A.shape, generator=generator) * 0.02)
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.02)
    return lorakit.save_adapter(model, root / name, name)
