"""A module's weight update ``ΔW`` (d_out x d_in, the layout of ``nn.Linear.weight``), low-rank or dense.

Both kinds give the thin SVD ``ΔW = U diag(S) Vh`` that spectra, intruder mitigation and subspace
overlaps need. A LoRA update ``ΔW = s B A`` never forms the dense matrix: with ``B = Q_b R_b`` and
``Aᵀ = Q_a R_a`` (QR), ``ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ``, and the SVD of the small ``r x r`` core gives
ΔW's exactly. A dense update (two full weight sets) is decomposed directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (d_out, k), S (k,), Vh (k, d_in)


@dataclass(frozen=True)
class LowRankDelta:
    """``ΔW = B @ A`` with the scale folded into ``B`` (float64): B (d_out, r), A (r, d_in)."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def svd(self) -> Svd:
        q_b, r_b = torch.linalg.qr(self.B)
        q_a, r_a = torch.linalg.qr(self.A.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        return q_b @ u, s, vh @ q_a.T


@dataclass(frozen=True)
class DenseDelta:
    """``ΔW`` as a dense matrix (the difference of two weight sets)."""

    matrix: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def dense(self) -> torch.Tensor:
        return self.matrix

    def svd(self) -> Svd:
        return torch.linalg.svd(self.matrix.double(), full_matrices=False)


Delta = LowRankDelta | DenseDelta
