"""What :func:`~lorakit.combine.combine_adapters` did: the mode, the ranks written and, for ``svd``, the
relative Frobenius error of the truncation, per module and overall.

With the singular values ``S`` of a module's exact delta and ``k`` kept,

    error_m = ||Δ_m - Δ_m,k||_F / ||Δ_m||_F = sqrt(Σ_{j>k} S_j² / Σ_j S_j²)        (0 for Δ_m = 0)
    error   = sqrt(Σ_m ||Δ_m - Δ_m,k||² / Σ_m ||Δ_m||²)                          (over every module)

``cat`` and ``linear`` are exact by construction and report 0 (up to the float32 rounding of the
written factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TruncationError:
    """The squared Frobenius norms of a module's delta and of what truncating it leaves out."""

    dropped: float
    """``||Δ - Δ_k||_F² = Σ_{j>k} S_j²``."""
    total: float
    """``||Δ||_F² = Σ_j S_j²``."""

    @classmethod
    def of(cls, singular_values: torch.Tensor, kept: int) -> TruncationError:
        squares = singular_values.double().square()
        return cls(dropped=float(squares[kept:].sum()), total=float(squares.sum()))

    @property
    def relative(self) -> float:
        """``||Δ - Δ_k||_F / ||Δ||_F``; 0 for a zero delta (nothing to lose)."""
        return math.sqrt(self.dropped / self.total) if self.total > 0 else 0.0


def overall_error(errors: list[TruncationError]) -> float:
    """The relative error of all modules together, each weighted by its delta's energy."""
    return TruncationError(dropped=sum(e.dropped for e in errors), total=sum(e.total for e in errors)).relative


@dataclass(frozen=True)
class CombineReport:
    """The outcome of one combination (``to_dict()`` is what ``lorakit combine`` prints)."""

    mode: str
    """``"cat"``, ``"svd"`` or ``"linear"``."""
    out: Path
    """The adapter directory written."""
    adapters: tuple[tuple[str, float], ...]
    """The source adapters and their weights, in order."""
    ranks: dict[str, int]
    """The rank written for each module."""
    relative_error: float = 0.0
    """``svd``: ``||Δ - Δ_k||_F / ||Δ||_F`` over all modules; 0 for the exact modes."""
    module_errors: dict[str, float] = field(default_factory=dict)
    """``svd``: each module's relative error; empty for the exact modes."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {"mode": self.mode, "out": str(self.out),
                "adapters": [{"path": path, "weight": weight} for path, weight in self.adapters],
                "ranks": dict(self.ranks), "relative_error": self.relative_error,
                "module_errors": dict(self.module_errors)}
