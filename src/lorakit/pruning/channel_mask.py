"""PAT's one channel mask, shared by every hybrid sparsification module of a model (Liu et al., "PAT:
Pruning-Aware Tuning for Large Language Models", AAAI'25, arXiv 2408.14721).

One trainable raw vector mu (d,), zeros at the start, gives the mask m (d,) of step t of a run of G optimizer
steps (t 0-based)::

    T(t) = 1 / (1 - log(max(1, t)) / log(G) + 1e-6)       temperature (log G = 0 for G = 1: the ratio is 0)
    b(t) = max(0.5 - t / G, 0)                            bias
    m    = sigmoid(T(t) mu) + b(t)                        for t < freeze G (mu = 0 at t = 0 gives m = 1)
    m    = 1[j in top_k(mu)]  (detached)                  from t >= freeze G on

The second line is lorakit's deviation from the paper (which keeps the soft mask to the end): the k channels with
the largest mu (ties to the lower index), so that the last steps train on exactly the model that is cut. In the
hard phase mu receives no gradient, so the kept set no longer moves.

The mask-count loss that drives mu towards k = round(keep d) kept channels::

    L = 10 |sum_j binarize(mu_j) - k| / k + mean_{mu_j > 0} (mu_j - 0.5)^2 + mean_{mu_j <= 0} (mu_j + 0.5)^2

with binarize(mu) = 1[mu >= 0] and a straight-through (identity) gradient. The mean of an empty set counts 0
here; the paper's code takes the mean of an empty tensor, which is NaN at the start (every mu_j = 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

COUNT_WEIGHT = 10.0
"""The weight of the relative count error |sum binarize(mu) - k| / k (the paper's)."""


def kept_channels(width: int, keep: float) -> int:
    """k = round(keep * width), at least one channel."""
    return max(1, round(keep * width))


def temperature(step: int, total: int) -> float:
    """T(t) = 1 / (1 - log(max(1, t)) / log(G) + 1e-6); a run of one step has ratio 0."""
    ratio = math.log(max(1, step)) / math.log(total) if total > 1 else 0.0
    return 1.0 / (1.0 - ratio + 1e-6)


def mask_bias(step: int, total: int) -> float:
    """b(t) = max(0.5 - t / G, 0)."""
    return max(0.5 - step / total, 0.0)


def soft_mask(raw: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """sigmoid(T(t) mu) + b(t), differentiable in mu."""
    return torch.sigmoid(temperature(step, total) * raw) + mask_bias(step, total)


def kept_indices(raw: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` channels with the largest mu, ties to the lower index, ascending (long, on mu's device)."""
    order = torch.sort(raw.detach(), descending=True, stable=True).indices
    return torch.sort(order[:kept]).values


def hard_mask(raw: torch.Tensor, kept: int) -> torch.Tensor:
    """1 at :func:`kept_indices`, 0 elsewhere; no gradient."""
    mask = torch.zeros_like(raw.detach())
    return mask.index_fill_(0, kept_indices(raw, kept), 1.0)


def binarize(raw: torch.Tensor) -> torch.Tensor:
    """1[mu >= 0] in the forward, the identity in the backward (straight-through)."""
    return (raw >= 0).to(raw.dtype) + raw - raw.detach()


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.sum()


def mask_count_loss(raw: torch.Tensor, kept: int) -> torch.Tensor:
    """10 |sum binarize(mu) - k| / k + mean_{mu > 0} (mu - 0.5)^2 + mean_{mu <= 0} (mu + 0.5)^2 (empty mean: 0)."""
    count = COUNT_WEIGHT * (binarize(raw).sum() - kept).abs() / kept
    positive = raw > 0
    return count + _mean_or_zero((raw[positive] - 0.5) ** 2) + _mean_or_zero((raw[~positive] + 0.5) ** 2)


class ChannelMask(nn.Module):
    """The shared mask: the raw parameter mu (``width``,), ``kept`` = round(keep width) channels kept at the end,
    the hard phase from ``freeze`` G on. :meth:`set_step` tells it where the run stands."""

    def __init__(self, width: int, keep: float, freeze: float) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(width))
        self.kept, self.freeze = kept_channels(width, keep), freeze
        self.step, self.total = 0, 1

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    @property
    def hard(self) -> bool:
        """True from step freeze G on."""
        return self.step >= self.freeze * self.total

    def forward(self) -> torch.Tensor:
        """The mask m (width,) of the current step."""
        return hard_mask(self.raw, self.kept) if self.hard else soft_mask(self.raw, self.step, self.total)

    def loss(self) -> torch.Tensor:
        """The mask-count loss; a constant 0 in the hard phase (mu gets no gradient, so AdamW leaves it)."""
        return self.raw.new_zeros(()) if self.hard else mask_count_loss(self.raw, self.kept)

    def kept_indices(self) -> torch.Tensor:
        """The channels the final cut keeps (ascending)."""
        return kept_indices(self.raw, self.kept)

    def extra_repr(self) -> str:
        return f"width={self.raw.numel()}, kept={self.kept}, freeze={self.freeze}"
