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


def saved_for_backward_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one forward of ``model`` on ``ids`` (with labels ``ids``),
    not counting references to the model's own parameters and buffers (which it holds anyway); then runs that
    backward, leaving gradients the caller clears."""
    stored = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in stored:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved)


def lm_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor):
    """A function taking one optimizer step on the language-model loss of ``ids`` (labels = inputs); it returns
    the loss."""
    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()
    return step
