"""``lorakit demo``: the main job end to end on the real default model.

Load SmolLM2-135M-Instruct, score it on the held-out split of a built-in task, train a LoRA adapter
(r = 16, all linear layers) on the task's train split, and score the adapter on the same held-out
examples. The base model answers none of them exactly; the adapter should answer most.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.activation import disabled
from lorakit.core.lifecycle import attach
from lorakit.data.tasks import get_task
from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train import train

DEMO_TASK = "date"
DEMO_LORA = LoraConfig(rank=16, alpha=32, targets="all-linear")
DEMO_TRAINING = TrainConfig(steps=60, batch_size=8, lr=1e-3, log_every=10, seed=0)


@dataclass
class DemoResult:
    """Held-out exact match of the base model and of the trained adapter."""

    task: str
    base: EvalResult
    adapted: EvalResult
    train_seconds: float
    adapter_dir: Path


def run_demo(*, task: str | None = None, steps: int | None = None, out: str | Path | None = None,
             test_n: int | None = None, base: str = DEFAULT_MODEL, report=print) -> DemoResult:
    """Run the demo and print (through ``report``) a comparison; returns the numbers."""
    task_name = task or DEMO_TASK
    spec = get_task(task_name)
    config = TrainConfig(**{**DEMO_TRAINING.__dict__, "steps": steps or DEMO_TRAINING.steps})
    train_examples = spec.examples("train", config.steps * config.batch_size)
    test_examples = spec.examples("test", test_n or 100)
    report(f"lorakit demo: task {task_name!r} ({spec.description}); model {base}")
    model, tokenizer = load_model(base)
    torch.manual_seed(config.seed)
    attach(model, DEMO_LORA)
    with disabled(model):
        base_result = evaluate(model, tokenizer, test_examples, progress=True)
    report(f"base model:    exact match {base_result.exact_match:6.1%} on {base_result.n} held-out examples")
    adapter_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="lorakit-demo-"))
    started = time.perf_counter()
    train(model, tokenizer, train_examples, config, out_dir=adapter_dir, overwrite=True)
    seconds = time.perf_counter() - started
    adapted = evaluate(model, tokenizer, test_examples, progress=True)
    report(f"with adapter:  exact match {adapted.exact_match:6.1%} on {adapted.n} held-out examples "
           f"(trained {config.steps} steps in {seconds:.0f} s; adapter in {adapter_dir})")
    example = test_examples[0]
    report(f"example: {example.prompt!r}\n  base: {base_result.predictions[0]!r}\n  adapter: "
           f"{adapted.predictions[0]!r}\n  expected: {example.answer!r}")
    return DemoResult(task_name, base_result, adapted, seconds, adapter_dir)
