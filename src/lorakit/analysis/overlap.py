"""How much two updates of one matrix share: the overlap of their top singular subspaces.

For orthonormal bases ``U_1`` (d x k_1) and ``U_2`` (d x k_2) of the top left singular vectors of two
updates, ``overlap = ||U_1ᵀ U_2||_F² / min(k_1, k_2)``, in [0, 1]: 1 when one subspace contains the
other, 0 when they are orthogonal, about ``max(k_1, k_2) / d`` for random subspaces. It is the
normalised subspace similarity ``φ`` of the LoRA paper (Hu et al. 2021, §7.2) at full ranks; the right
singular vectors (input side) give the same for ``V``.
"""

from __future__ import annotations

import torch

from lorakit.analysis.deltas import Delta

OVERLAP_RANK = 16
"""Singular directions compared per update when a dense update has no rank of its own."""


def subspace_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """``||firstᵀ second||_F² / min(k_1, k_2)`` for orthonormal columns ``first`` and ``second``."""
    k = min(first.shape[1], second.shape[1])
    if k == 0:
        return 0.0
    return float((first.T @ second).square().sum() / k)


def _top_directions(delta: Delta, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = delta.svd()
    kept = min(rank, int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0)
    return u[:, :kept].double(), vh[:kept].T.double()


def delta_overlap(first: Delta, second: Delta, rank: int = OVERLAP_RANK) -> dict[str, float]:
    """The left (output-side) and right (input-side) overlaps of the two updates' top-``rank`` directions."""
    u_1, v_1 = _top_directions(first, rank)
    u_2, v_2 = _top_directions(second, rank)
    return {"left": subspace_overlap(u_1, u_2), "right": subspace_overlap(v_1, v_2)}
