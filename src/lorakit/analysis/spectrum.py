"""The singular spectrum of a weight update and the numbers that summarise it.

For ``ΔW`` with singular values ``σ_1 >= σ_2 >= ...``:

* ``norm = ||ΔW||_F = sqrt(Σ σ_i²)`` and ``relative_norm = ||ΔW||_F / ||W_0||_F``;
* ``effective_rank = exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` and ``H`` the Shannon entropy (Roy and
  Vetterli 2007, "The effective rank: a measure of effective dimensionality"): 1 for a rank-1 update,
  ``r`` for ``r`` equal singular values;
* ``rank``: the numerical rank, the count of ``σ_i > max(d_out, d_in) · eps · σ_1`` (NumPy's rule).
"""

from __future__ import annotations

import torch

SPECTRUM_KEPT = 64
"""Singular values written per module in the report (the largest ones)."""


def effective_rank(singular_values: torch.Tensor) -> float:
    """``exp(-Σ p_i log p_i)``, ``p = σ / Σσ`` (0 for a zero update)."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """The count of singular values above ``max(shape) · eps · σ_max``."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 0
    tolerance = max(shape) * torch.finfo(singular_values.dtype).eps * singular_values[0]
    return int((singular_values > tolerance).sum())


def spectrum_summary(singular_values: torch.Tensor, shape: tuple[int, int], base_norm: float) -> dict:
    """Norm, relative norm, effective and numerical rank, and the largest :data:`SPECTRUM_KEPT` values."""
    norm = float(singular_values.square().sum().sqrt())
    return {"norm": norm, "relative_norm": norm / base_norm if base_norm > 0 else float("inf"),
            "effective_rank": effective_rank(singular_values), "rank": numerical_rank(singular_values, shape),
            "singular_values": [float(v) for v in singular_values[:SPECTRUM_KEPT]]}
