"""``lorakit demo``: the main job end to end on the real default model.

Load SmolLM2-135M-Instruct, score it on the held-out split of a built-in task, train a LoRA adapter
(r = 16, all linear layers) on the task's train split, and score the adapter on the same held-out
examples. The base model answers none of them exactly; the adapter should answer most.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.activation import disabled
from lorakit.core.lifecycle import attach
from lorakit.data.tasks import get_task
from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train import train

DEMO_LORA = LoraConfig(rank=16, alpha=32, targets="all-linear")
DEMO_TRAINING = TrainConfig(steps=60, batch_size=8, lr=1e-3, log_every=10, seed=0, keep_freed_memory=True)


@dataclass(frozen=True, kw_only=True)
class LoraDemo:
    """One LoRA adapter against the base model on a built-in task (the default demo; a few minutes)."""

    task: str = "date"
    """The built-in task to train and score (lorakit tasks list)."""
    steps: int = DEMO_TRAINING.steps
    """Optimizer steps of batch 8 at learning rate 1e-3."""
    test_n: int = 100
    """Held-out examples scored by the base model and by the adapter."""
    out: str | None = None
    """Where the adapter goes; None: a new temporary directory."""


@dataclass
class DemoResult:
    """Held-out exact match of the base model and of the trained adapter."""

    task: str
    base: EvalResult
    adapted: EvalResult
    train_seconds: float
    adapter_dir: Path


def run_demo(demo: LoraDemo = LoraDemo(), *, base: str = DEFAULT_MODEL, report=print, **changes) -> DemoResult:
    """Run the demo (``demo`` with ``changes``, e.g. ``steps=20``) and print (through ``report``) a comparison;
    returns the numbers."""
    demo = replace(demo, **changes)
    spec = get_task(demo.task)
    config = replace(DEMO_TRAINING, steps=demo.steps)
    train_examples = spec.examples("train", config.steps * config.batch_size)
    test_examples = spec.examples("test", demo.test_n)
    report(f"lorakit demo: task {demo.task!r} ({spec.description}); model {base}")
    model, tokenizer = load_model(base)
    torch.manual_seed(config.seed)
    attach(model, DEMO_LORA)
    with disabled(model):
        base_result = evaluate(model, tokenizer, test_examples, progress=True)
    report(f"base model:    exact match {base_result.exact_match:6.1%} on {base_result.n} held-out examples")
    adapter_dir = Path(demo.out) if demo.out is not None else Path(tempfile.mkdtemp(prefix="lorakit-demo-"))
    started = time.perf_counter()
    train(model, tokenizer, train_examples, config, out_dir=adapter_dir, overwrite=True)
    seconds = time.perf_counter() - started
    adapted = evaluate(model, tokenizer, test_examples, progress=True)
    report(f"with adapter:  exact match {adapted.exact_match:6.1%} on {adapted.n} held-out examples "
           f"(trained {config.steps} steps in {seconds:.0f} s; adapter in {adapter_dir})")
    example = test_examples[0]
    report(f"example: {example.prompt!r}\n  base: {base_result.predictions[0]!r}\n  adapter: "
           f"{adapted.predictions[0]!r}\n  expected: {example.answer!r}")
    return DemoResult(demo.task, base_result, adapted, seconds, adapter_dir)
