"""The Sylvester equation ``P X + X Q = C`` for symmetric positive semi-definite ``P`` and ``Q``.

LoRA-Pro's ``X`` solves ``(B^T B) X + X (A A^T) = C`` (see :mod:`lorakit.optim.lora_pro`). Both Gram
matrices are symmetric PSD, so real eigendecompositions suffice (the released LoRA-Pro code uses a complex
``eig`` instead): with ``P = U diag(R) U^T`` and ``Q = V diag(S) V^T`` the equation becomes
``diag(R) Y + Y diag(S) = U^T C V`` for ``Y = U^T X V``, which is solved entry by entry.
"""

from __future__ import annotations

import torch


def solve_symmetric_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, delta: float = 1e-8) -> torch.Tensor:
    """The ``X`` (p x q) with ``(P + delta I) X + X Q = C`` for symmetric PSD ``P`` (p x p) and ``Q`` (q x q).

    ``Y_ij = F_ij / (R_i + S_j + delta)`` with ``F = U^T C V``, then ``X = U Y V^T``. Eigenvalues are
    clamped at 0 (round-off can make them slightly negative), so ``delta > 0`` keeps every denominator
    positive; with ``delta = 0`` an entry whose denominator is 0 gets ``Y_ij = 0``, the least-norm
    solution. The work is done in float64 and the result is cast back to ``C``'s dtype.
    """
    R, U = torch.linalg.eigh(P.double())
    S, V = torch.linalg.eigh(Q.double())
    F = U.T @ C.double() @ V
    denominator = R.clamp_min(0)[:, None] + S.clamp_min(0)[None, :] + delta
    Y = torch.where(denominator > 0, F / denominator, torch.zeros_like(F))
    return (U @ Y @ V.T).to(C.dtype)
