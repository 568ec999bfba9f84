"""The k-bit NormalFloat code books (NF-k) and the nearest-entry rounding onto them.

NormalFloat (QLoRA: Dettmers et al. 2023) places the ``2^k`` values of a k-bit code at quantiles of
N(0, 1), so that normally distributed weights fill every code about equally often. The code is
asymmetric so that 0 is exactly representable: with ``h = 2^(k-1)`` and the outermost quantile
``p = 0.9677083``,

    positives = Phi^-1(linspace(p, 1/2, h + 1)[:-1])         (h values)
    negatives = -Phi^-1(linspace(p, 1/2, h)[:-1])            (h - 1 values)
    code      = sort(negatives ++ [0] ++ positives) / Phi^-1(p)

so the code runs from exactly -1 to exactly 1. This is bitsandbytes' ``create_normal_map`` at k = 4
(``p`` is its constant: the mean of ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``), computed the same way
(float32 quantiles, float64 ``Phi^-1``, float32 normalisation), so NF4 here is bitsandbytes' NF4 table
bit for bit. LQ-LoRA (Guo et al., ICLR 2024) generalises it to k in {2, 3, 4, 8} with the same ``p``
for every k; so do we.

A value ``x`` in [-1, 1] rounds to the nearest code entry, ties to the lower one (bitsandbytes' rule:
``bucketize`` on the midpoints between neighbouring entries).
"""

from __future__ import annotations

from functools import cache

import torch

BITS = (2, 3, 4, 8)
"""The code widths lorakit builds a NormalFloat code book for."""

OUTER_QUANTILE = 0.9677083
"""``p``: the quantile of N(0, 1) that the code's extremes (+-1) stand for (bitsandbytes' NF4 offset)."""


@cache
def _code_book_float32(bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    upper = torch.linspace(OUTER_QUANTILE, 0.5, half + 1)[:-1].double()  # (h,) in float32, then widened
    lower = torch.linspace(OUTER_QUANTILE, 0.5, half)[:-1].double()  # (h - 1,)
    positives = torch.special.ndtri(upper).float()
    negatives = -torch.special.ndtri(lower).float()
    values = torch.cat([negatives, torch.zeros(1), positives]).sort().values  # (2^k,)
    return values / values.max()


def code_book(bits: int) -> torch.Tensor:
    """The NF-``bits`` code book: ``2^bits`` sorted float32 values from -1 to 1, with 0 among them."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}: a NormalFloat code book exists for {', '.join(map(str, BITS))} bits")
    return _code_book_float32(bits).clone()


def largest_gap(bits: int) -> float:
    """The widest distance between neighbouring entries of the NF-``bits`` code book."""
    return float(torch.diff(_code_book_float32(bits)).max())


def nearest_codes(normalised: torch.Tensor, bits: int) -> torch.Tensor:
    """The index of the nearest NF-``bits`` entry for every value of ``normalised`` (ties to the lower
    entry), as uint8; values beyond +-1 take the end entries."""
    book = _code_book_float32(bits).to(normalised.device)
    midpoints = (book[:-1] + book[1:]) / 2  # (2^k - 1,)
    return torch.bucketize(normalised.float(), midpoints).to(torch.uint8)
