"""EVA's rank redistribution: the rank budget goes to the directions that explain the most variance.

Paischer et al. 2024 ("One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170, Sec. 3.2): every layer ``l`` offers the explained-variance ratios of its
top ``k_l = round(rho r_l)`` principal components; all offers are pooled and sorted, the top
``R = sum_l r_l`` are kept, and layer ``l`` gets ``r'_l`` = how many of its own were kept. The budget
is therefore unchanged (``sum_l r'_l = R``), ``r'_l <= k_l``, and ``rho = 1`` keeps every ``r_l``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def redistribute(ratios: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
    """``r'_l`` per layer from each layer's descending explained-variance ratios (length ``k_l``).

    Ties are broken by layer order, then component order, so the result is deterministic and each
    layer keeps a prefix of its components."""
    names = list(ratios)
    owners = torch.cat([torch.full((len(ratios[n]),), i, dtype=torch.long) for i, n in enumerate(names)])
    values = torch.cat([ratios[n].detach().float().cpu() for n in names])
    kept = owners[values.argsort(descending=True, stable=True)[:budget]]
    counts = torch.bincount(kept, minlength=len(names)).tolist()
    return dict(zip(names, counts, strict=True))
