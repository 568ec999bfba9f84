"""A few optimizer steps on a model's adapter, for the tests that train on quantized bases."""

from __future__ import annotations

import torch
from torch import nn

import lorakit


def adapter_losses(model: nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps on ``model``'s trainable adapter parameters (language-model loss on ``ids``, the
    model in training mode); the loss before each step."""
    optimizer = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
