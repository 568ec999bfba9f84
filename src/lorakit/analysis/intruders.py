"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv 2410.21228, Algorithm 1).

With ``W_0 = U_0 Σ_0 V_0ᵀ`` and the fine-tuned ``W_t = W_0 + ΔW = U_t Σ_t V_tᵀ`` (SVDs in fp32), the
``j``-th left singular vector of ``W_t`` (``j <= k``, by singular value) is an *intruder* when it is
far from every pre-trained one:

    max_i |<U_0[:, i], U_t[:, j]>| < ε          (the maximum over all of W_0's left singular vectors)

The count per matrix is ``#{j <= k : intruder}``; a model's is the sum over its matrices. The code's
defaults are ``k = 10`` and ``ε = 0.5``; the paper sweeps ``ε``. Each matrix's ``k`` maximal cosines
are kept, so a sweep over ``ε`` costs no further SVD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOP_K = 10
EPSILON = 0.5
EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The default sweep of ε."""


@dataclass(frozen=True)
class IntruderScan:
    """One matrix: for each of ``W_t``'s top-k left singular vectors, its largest |cosine| with ``W_0``'s,
    and the vectors and singular values themselves (for mitigation)."""

    max_cosines: torch.Tensor  # (k,)
    U: torch.Tensor  # (d_out, k) left singular vectors of W_t
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, d_in)

    def intruders(self, epsilon: float) -> list[int]:
        """Indices ``j`` (0-based, by singular value) whose vector is an intruder at ``epsilon``."""
        return [j for j, cosine in enumerate(self.max_cosines.tolist()) if cosine < epsilon]

    def count(self, epsilon: float) -> int:
        return len(self.intruders(epsilon))


def scan_intruders(base: torch.Tensor, delta: torch.Tensor, top_k: int = TOP_K) -> IntruderScan:
    """Scan ``W_t = base + delta`` (both d_out x d_in) against ``base``, in fp32."""
    base = base.float()
    u_base, _, _ = torch.linalg.svd(base, full_matrices=False)
    u_tuned, s_tuned, vh_tuned = torch.linalg.svd(base + delta.float(), full_matrices=False)
    k = min(top_k, s_tuned.numel())
    cosines = (u_base.T @ u_tuned[:, :k]).abs().amax(dim=0)
    return IntruderScan(cosines, u_tuned[:, :k], s_tuned[:k], vh_tuned[:k])


def counts_over(scans: Sequence[IntruderScan], epsilons: Sequence[float]) -> list[int]:
    """The total intruder count of ``scans`` at each ``ε`` of ``epsilons``."""
    return [sum(scan.count(epsilon) for scan in scans) for epsilon in epsilons]
