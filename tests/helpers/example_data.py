"""Example data: copy-task examples for training, and a labelled token batch with its reference logits."""

from __future__ import annotations

import random

import torch
from torch import nn

from lorakit.data.encoding import IGNORE_INDEX
from lorakit.data.example import Example

from .tiny_models import token_batch


def copy_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` examples "Copy: w" -> "w" with random words of 2-5 letters a-f."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5))) for _ in range(n)]
    return [Example(prompt=f"Copy: {w}", completion=w) for w in words]


def labelled_batch(rows: int = 3, length: int = 10) -> dict:
    """Random tokens, right padding on row 1, and prompts of different lengths masked out."""
    ids = token_batch(rows, length)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    for row, prompt in enumerate((4, 2, 6)[:rows]):
        labels[row, :prompt] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """The full (B, T, V) logits' supervised rows, the way a loss over all logits selects them."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    return logits[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]
