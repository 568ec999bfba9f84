"""The settings of L4Q's quantizer (Jeon, Kim, Kim, ACL'25, arXiv 2402.04902): bits, group size, LSQ scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class L4QConfig:
    """An asymmetric uniform ``bits``-bit grid per group of ``group_size`` input columns.

    Codes are unsigned, ``Qn = 0 .. Qp = 2^bits - 1``; the grid of a group is ``Delta * (q + z)`` with a learned
    step ``Delta`` and a learned real offset ``z`` (in steps), so ``-z`` is the code that dequantizes to zero."""

    bits: int = 4
    """Bits per weight code, 2 to 8 (codes are stored one per byte)."""
    group_size: int = 128
    """Input columns sharing one ``(Delta, z)``; a width it does not divide ends in a shorter group."""
    lsq_grad_scale: bool = False
    """Multiply ``dL/dDelta`` and ``dL/dz`` by LSQ's ``1 / sqrt(N_group * Qp)`` (Esser et al., ICLR 2020).
    Off by default: with Adam(W), which divides each gradient by its own running magnitude, a constant factor
    per group changes nothing but the weight of ``eps``; it matters with SGD."""
    tile_elements: int = 1 << 20
    """The backward forms ``dL/dW_q`` this many elements at a time (whole output rows), so no layer's
    full-size weight gradient ever exists at once; a layer smaller than this takes one tile."""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"L4QConfig.bits is {self.bits!r}; an integer from 2 to 8 is required")
        for field, value in (("group_size", self.group_size), ("tile_elements", self.tile_elements)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"L4QConfig.{field} is {value!r}; a positive integer is required")
        if not isinstance(self.lsq_grad_scale, bool):
            raise ConfigError(f"L4QConfig.lsq_grad_scale is {self.lsq_grad_scale!r}; True or False is required")

    @property
    def qmin(self) -> int:
        """``Qn``, the smallest code."""
        return 0

    @property
    def qmax(self) -> int:
        """``Qp = 2^bits - 1``, the largest code."""
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        """How many groups a row of ``in_features`` columns has: ``ceil(in / group_size)``."""
        return math.ceil(in_features / self.group_size)
