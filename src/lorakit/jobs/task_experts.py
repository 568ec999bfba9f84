"""Task experts for the mixture demos: one LoRA adapter per built-in task, and a shuffled task mix.

Both the X-LoRA demo and the mixtures comparison start from the same experts (same config, steps,
seed), so their numbers describe the same adapters.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.lifecycle import attach
from lorakit.data.example import Example
from lorakit.data.tasks import get_task
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train import TrainResult, train

EXPERT_LORA = LoraConfig(rank=16, alpha=32, targets="all-linear")
EXPERT_LR = 1e-3


def train_task_expert(task: str, out: str | Path, *, steps: int, lora: LoraConfig = EXPERT_LORA,
                      base: str = DEFAULT_MODEL, progress: bool = True) -> TrainResult:
    """Train adapter ``task`` on ``steps`` batches of 8 of the built-in task's train split into ``out``."""
    model, tokenizer = load_model(base)
    torch.manual_seed(0)
    attach(model, lora, task)
    config = TrainConfig(steps=steps, batch_size=8, lr=EXPERT_LR, log_every=10, keep_freed_memory=True)
    return train(model, tokenizer, get_task(task).examples("train", steps * 8), config, out_dir=out,
                 overwrite=True, progress=progress)


def mixed_task_examples(tasks: tuple[str, ...], per_task: int, *, seed: int = 0) -> list[Example]:
    """``per_task`` train examples of each task (each carrying its ``task``), shuffled together."""
    examples = [e for task in tasks for e in get_task(task).examples("train", per_task)]
    random.Random(seed).shuffle(examples)
    return examples
