"""One LoRA adapter on one layer: the factors ``A`` and ``B``, its scale and its dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.kinds import LayerKind


class LoraAdapter(nn.Module):
    """The trainable pair ``(A, B)`` of one adapter on one base layer.

    The delta it adds is ``scale * up(down(dropout(x), A), B)``, i.e. ``scale * B A x`` for a
    linear layer, with ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
    ``A`` and ``B`` are registered parameters, so DDP, FSDP and optimisers see them as usual.
    """

    def __init__(self, base: nn.Module, kind: LayerKind, *, rank: int, alpha: float, scale: float,
                 dropout: float, init: str) -> None:
        super().__init__()
        weight = base.weight
        a_shape, b_shape = kind.shapes(base, rank)
        self.A = nn.Parameter(torch.empty(a_shape, dtype=torch.float32, device=weight.device))
        self.B = nn.Parameter(torch.empty(b_shape, dtype=torch.float32, device=weight.device))
        kind.initialise(self.A, self.B, init)
        self.rank = rank
        self.alpha = alpha
        self.scale = scale
        self.dropout = dropout if kind.uses_dropout else 0.0

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input: ``x`` with this adapter's dropout in training mode."""
        if self.dropout == 0.0 or not self.training:
            return x
        return F.dropout(x, self.dropout, training=True)
