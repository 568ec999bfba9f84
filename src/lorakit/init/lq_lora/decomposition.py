"""LQ-LoRA's decomposition of one weight into a quantized part plus a low-rank part: ``W ~= Q + L1 L2``.

LQ-LoRA (Guo et al., "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language Model
Finetuning", ICLR 2024, Sec. 3.1) and LoftQ (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for
Large Language Models", ICLR 2024) start from ``Q = 0`` and alternate::

    L1 L2 = SVD_r(W - Q)                        L1 = U sqrt(S) (out, r), L2 = sqrt(S) V^T (r, in)
    Q     = dequantize(quantize_nf(W - L1 L2))  under one NFConfig

up to ``max_iterations`` times, stopping as soon as ``||W - L1 L2 - Q||_F`` stops falling; the best
iterate is kept.

**Fisher-weighted** (LQ-LoRA Sec. 3.3): with ``F`` (out, in) the empirical Fisher of ``W`` (squared
gradients), ``D_r = sqrt(mean over columns of F)`` (out,) and ``D_c = sqrt(mean over rows of F)`` (in,),
the low-rank step takes ``SVD_r(D_r (W - Q) D_c)`` and divides back, ``L1 / D_r[:, None]`` and
``L2 / D_c[None, :]`` (the paper's two-sided heuristic), and the error is ``||sqrt(F) * (W - L1 L2 - Q)||_F``.
Weights below 1e-3 of the largest are raised to it, so that rows or columns no gradient reached stay finite.

**The SVD** is exact (``torch.linalg.svd``) when ``min(out, in) <= 256``: there it takes milliseconds and
makes every low-rank step the optimal one (and the tests' small matrices deterministic without a seed).
Larger weights use LQ-LoRA's randomized SVD, ``torch.svd_lowrank`` with ``r + 10`` columns (10
oversampling columns) and 2 power iterations, ``O(out in r)`` per step instead of ``O(out in min(out, in))``,
under a fixed seed so that every run agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import ConfigError
from lorakit.quant.nf_config import NFConfig
from lorakit.quant.quantized_tensor import NFTensor, quantize_nf

EXACT_SVD_MAX_DIM = 256
"""Weights whose smaller side is at most this use the exact SVD, larger ones the randomized one."""
OVERSAMPLING = 10
"""Extra columns of the randomized SVD (LQ-LoRA's choice)."""
WEIGHT_FLOOR = 1e-3
"""Fisher row/column weights are raised to this fraction of their largest value."""


@dataclass(frozen=True)
class Decomposition:
    """``W ~= Q + L1 L2`` for one weight, at the best iterate of the alternation."""

    quantized: NFTensor
    """Q, (out, in)."""
    L1: torch.Tensor
    """(out, r) float32, ``U sqrt(S)`` (divided by ``D_r`` when Fisher-weighted)."""
    L2: torch.Tensor
    """(r, in) float32, ``sqrt(S) V^T`` (divided by ``D_c`` when Fisher-weighted)."""
    errors: tuple[float, ...]
    """The (weighted) Frobenius error after every iteration run; the last may be the one that stopped it."""

    @property
    def best(self) -> int:
        """The index in ``errors`` of the iterate kept."""
        return min(range(len(self.errors)), key=self.errors.__getitem__)

    @property
    def error(self) -> float:
        """The (weighted) error of the iterate kept: ``||sqrt(F) * (W - L1 L2 - Q)||_F``."""
        return self.errors[self.best]


def side_weights(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D_r (out,), D_c (in,))``: square roots of ``fisher``'s row and column means, floored (module docstring)."""
    rows, columns = fisher.mean(dim=1).sqrt(), fisher.mean(dim=0).sqrt()
    return _floored(rows), _floored(columns)


def _floored(weights: torch.Tensor) -> torch.Tensor:
    largest = weights.max()
    return torch.ones_like(weights) if largest <= 0 else weights.clamp_min(largest * WEIGHT_FLOOR)


def low_rank(matrix: torch.Tensor, rank: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1 (out, r), L2 (r, in))`` with ``L1 L2`` the best rank-``rank`` approximation of ``matrix``."""
    if min(matrix.shape) <= EXACT_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:
        with torch.random.fork_rng(devices=[matrix.device] if matrix.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(matrix, q=min(rank + OVERSAMPLING, *matrix.shape), niter=2)
        U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    root = S.sqrt()
    return U * root, (V * root).T


def decompose(weight: torch.Tensor, rank: int, config: NFConfig, *, fisher: torch.Tensor | None = None,
              max_iterations: int = 100, seed: int = 0) -> Decomposition:
    """Alternate the low-rank fit and the quantization of ``weight`` (out, in); see the module docstring.

    ``fisher`` (out, in), if given, weights the low-rank step and the error. ``rank = 0`` is plain
    quantization. Runs in float32 on ``weight``'s device."""
    if weight.dim() != 2 or rank < 0 or rank > min(weight.shape) or max_iterations < 1:
        raise ConfigError(f"decompose: a (out, in) weight, 0 <= rank <= min(out, in) and max_iterations >= 1 "
                          f"are required; got shape {tuple(weight.shape)}, rank={rank}, "
                          f"max_iterations={max_iterations}")
    if fisher is not None and fisher.shape != weight.shape:
        raise ConfigError(f"decompose: the Fisher has shape {tuple(fisher.shape)}, the weight {tuple(weight.shape)}")
    weight = weight.detach().float()
    error_weights = None if fisher is None else fisher.to(weight.device, torch.float32).sqrt()  # (out, in)
    rows, columns = side_weights(fisher.to(weight)) if fisher is not None else (None, None)
    dequantized = torch.zeros_like(weight)  # Q, (out, in)
    best: Decomposition | None = None
    errors: list[float] = []
    for _ in range(max_iterations):
        residual = weight - dequantized
        if rows is None:
            L1, L2 = low_rank(residual, rank, seed=seed)
        else:
            L1, L2 = low_rank(rows[:, None] * residual * columns[None, :], rank, seed=seed)
            L1, L2 = L1 / rows[:, None], L2 / columns[None, :]
        quantized = quantize_nf(weight - L1 @ L2, config)
        dequantized = quantized.dequantize()
        remainder = weight - L1 @ L2 - dequantized
        errors.append(float(torch.linalg.norm(remainder if error_weights is None else error_weights * remainder)))
        if best is not None and errors[-1] >= best.error:
            break
        best = Decomposition(quantized, L1, L2, tuple(errors))
    return Decomposition(best.quantized, best.L1, best.L2, tuple(errors))
