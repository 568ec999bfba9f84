"""One LoRA adapter on one layer: the factors ``A`` and ``B``, its scale and its dropout.

Two training methods change which part of the factors the forward uses, both through
:meth:`LoraAdapter.factors` so that every routing path (static, per-row, dense, sparse) and merging
see the same update:

* **DyLoRA** (Valipour et al., EACL 2023) truncates to a nested rank ``b``:
  ``delta = s_b B[:, :b] A[:b] x`` with ``s_b = alpha / b`` (``alpha / sqrt(b)`` with rsLoRA); in the
  frozen mode the first ``b - 1`` components are detached, so only component ``b`` learns.
* **CoDyRA** (Lu et al. 2024) gates the components: ``delta = s B diag(w) A x`` with learnable ``w``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.kinds import LayerKind


@dataclass(frozen=True)
class NestedRank:
    """A DyLoRA truncation: use the first ``rank`` components; ``frozen`` detaches all but the last."""

    rank: int
    frozen: bool = False


class LoraAdapter(nn.Module):
    """The trainable pair ``(A, B)`` of one adapter on one base layer.

    The delta it adds is ``scale * up(down(dropout(x), A), B)``, i.e. ``scale * B A x`` for a
    linear layer, with ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
    ``A`` and ``B`` are registered parameters, so DDP, FSDP and optimisers see them as usual.
    """

    def __init__(self, base: nn.Module, kind: LayerKind, *, rank: int, alpha: float, scale: float,
                 dropout: float, init: str, rslora: bool = False) -> None:
        super().__init__()
        weight = base.weight
        a_shape, b_shape = kind.shapes(base, rank)
        # On a skeleton's base (weights on the meta device, filled later) the factors are real CPU tensors, drawn
        # as on a loaded base, so that a model filled after sharding starts from the same adapter.
        device = torch.device("cpu") if weight.device.type == "meta" else weight.device
        self.A = nn.Parameter(torch.empty(a_shape, dtype=torch.float32, device=device))
        self.B = nn.Parameter(torch.empty(b_shape, dtype=torch.float32, device=device))
        kind.initialise(self.A, self.B, init)
        self.register_parameter("gate", None)
        """CoDyRA's importance gates ``w`` (one per rank component), or None for plain LoRA."""
        self.rank = rank
        self.alpha = alpha
        self.scale = scale
        self.rslora = rslora
        self.dropout = dropout if kind.uses_dropout else 0.0
        self.nested: NestedRank | None = None
        """DyLoRA's current truncation, or None for the full rank."""

    def extra_repr(self) -> str:
        gated = ", gated" if self.gate is not None else ""
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}{gated}"

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input: ``x`` with this adapter's dropout in training mode."""
        if self.dropout == 0.0 or not self.training:
            return x
        return F.dropout(x, self.dropout, training=True)

    def scale_at(self, rank: int) -> float:
        """The scale the adapter's config gives a rank-``rank`` adapter: ``alpha / rank`` (rsLoRA: ``/ sqrt``)."""
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def gated_A(self) -> torch.Tensor:
        """``diag(w) A`` with CoDyRA's gates folded in (``A`` itself when there are none)."""
        if self.gate is None:
            return self.A
        return self.A * self.gate.reshape(-1, *([1] * (self.A.dim() - 1))).to(self.A.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The ``(A, B, scale)`` the forward uses: gated, and truncated to the nested rank if one is set."""
        A, B = self.gated_A(), self.B
        if self.nested is None or self.nested.rank >= self.rank:
            return A, B, self.scale
        rank = self.nested.rank
        A, B = A[:rank], B[:, :rank]
        if self.nested.frozen and rank > 1:
            A = torch.cat([A[:rank - 1].detach(), A[rank - 1:]], dim=0)
            B = torch.cat([B[:, :rank - 1].detach(), B[:, rank - 1:]], dim=1)
        return A, B, self.scale_at(rank)
