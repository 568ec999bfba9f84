"""PAT's hybrid sparsification module (HSM) on one increment of the residual stream (Liu et al., AAAI'25,
arXiv 2408.14721).

On a row vector x of width d, with the model's shared channel mask m (:mod:`lorakit.pruning.channel_mask`)::

    y = s * m * (x + (x U^T) V^T)        U: (r, d) kaiming-uniform (a = sqrt 5), V: (d, r) zeros, s: (d,) ones

so a fresh module with m = 1 is the identity. As a matrix on column vectors, y = M x with
M = diag(s * m) (I + V U), which the physical removal folds into the weights that write the increment.
The identity loss MSE(U U^T, I_r) keeps U near-orthonormal, which the paper says decouples the transformation
(U, V) from the scaling (s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HybridSparsification(nn.Module):
    """One HSM of ``width`` channels and operator rank ``rank`` (parameters in float32)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.empty(rank, width))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        self.V = nn.Parameter(torch.zeros(width, rank))
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y = s * m * (x + (x U^T) V^T); x (..., d), mask (d,), computed in x's dtype."""
        U, V, gain = self.U.to(x.dtype), self.V.to(x.dtype), (self.scale * mask).to(x.dtype)
        return (x + (x @ U.T) @ V.T) * gain

    def identity_loss(self) -> torch.Tensor:
        """MSE(U U^T, I_r), the mean over the r x r entries."""
        gram = self.U @ self.U.T  # (r, r)
        return F.mse_loss(gram, torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))

    def folded(self, mask: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """M = diag(s * m) (I + V U) (d, d), in ``dtype``: y = M x for a column vector x."""
        U, V = self.U.detach().to(dtype), self.V.detach().to(dtype)
        gain = (self.scale.detach() * mask.detach()).to(dtype)
        return gain[:, None] * (torch.eye(U.shape[1], device=U.device, dtype=dtype) + V @ U)
