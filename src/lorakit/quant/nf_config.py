"""How a weight is quantized: :class:`NFConfig` (LQ-LoRA's (b, b0, b1, B0, B1)) and its storage cost.

A weight is cut into blocks of ``B0`` values, each stored as ``b``-bit NormalFloat codes times the
block's absmax (QLoRA: Dettmers et al. 2023). With double quantization the absmax scales themselves
are quantized, in blocks of ``B1``, to ``b0``-bit codes, and each of those blocks keeps one ``b1``-bit
float scale (LQ-LoRA: Guo et al., ICLR 2024). Per parameter that costs

    with double quantization:     b + b0 / B0 + b1 / (B0 * B1)
    without (fp32 absmax scales): b + 32 / B0

(the one fp32 mean subtracted from the scales is per tensor and not counted, nor is the padding of
the last block).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from lorakit.errors import ConfigError, FormatError
from lorakit.quant.normal_float import BITS

BLOCK_SIZES = (16, 32, 64, 128, 256)
"""The allowed ``block_size`` (B0): values per absmax scale."""

SCALE_BLOCK_SIZES = (16, 64, 256)
"""The allowed ``scale_block_size`` (B1): absmax scales per second-level scale."""

SCALE_DTYPES: Mapping[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The allowed ``scale_dtype`` (b1), by name, with the torch dtype it stores."""


def _allowed(field_name: str, value: Any, allowed: tuple) -> None:
    if not any(type(value) is type(option) and value == option for option in allowed):  # no True for 1, 4.0 for 4
        raise ConfigError(f"NFConfig.{field_name}={value!r} is invalid: allowed values are "
                          f"{', '.join(map(repr, allowed))}")


@dataclass(frozen=True, kw_only=True)
class NFConfig:
    """A blockwise NormalFloat quantization; the defaults are QLoRA's NF4 with blocks of 64, without
    double quantization (``scale_bits=8`` gives bitsandbytes' double quantization)."""

    bits: int = 4
    """b: bits per weight code (NF-b)."""
    block_size: int = 64
    """B0: weights per block, each block scaled by its absmax."""
    scale_bits: int | None = None
    """b0: bits per absmax code under double quantization; None keeps the absmax scales in fp32."""
    scale_block_size: int = 256
    """B1: absmax scales per second-level block (used with double quantization)."""
    scale_dtype: str = "fp32"
    """b1: the float type of the second-level scales (used with double quantization)."""

    def __post_init__(self) -> None:
        _allowed("bits", self.bits, BITS)
        _allowed("block_size", self.block_size, BLOCK_SIZES)
        _allowed("scale_bits", self.scale_bits, (None, *BITS))
        _allowed("scale_block_size", self.scale_block_size, SCALE_BLOCK_SIZES)
        _allowed("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))

    @property
    def double_quant(self) -> bool:
        """Whether the absmax scales are themselves quantized."""
        return self.scale_bits is not None

    @property
    def name(self) -> str:
        """A short name: ``"nf4"`` for :data:`QLORA_NF4`, else e.g. ``"nf3-b128"`` or ``"nf2-b64-s8x256-fp32"``
        (block size, then the scales' bits, block and second-level type under double quantization)."""
        if self == QLORA_NF4:
            return "nf4"
        double = f"-s{self.scale_bits}x{self.scale_block_size}-{self.scale_dtype}" if self.double_quant else ""
        return f"nf{self.bits}-b{self.block_size}{double}"

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> NFConfig:
        """The config a JSON object describes; a :class:`FormatError` (naming ``where``) for unknown or
        missing fields or bad values."""
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: the quantization config is a JSON {type(obj).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(obj) - known), sorted(known - set(obj))
        if unknown or missing:
            raise FormatError(f"{where}: the quantization config has unknown fields {unknown} or lacks "
                              f"fields {missing}; lorakit's NFConfig has exactly {sorted(known)}")
        try:
            return cls(**obj)
        except ConfigError as err:
            raise FormatError(f"{where}: {err}") from None


QLORA_NF4 = NFConfig(bits=4, block_size=64, scale_bits=8)
"""QLoRA's NF4: blocks of 64, absmax scales double-quantized to 8 bits in blocks of 256 (bitsandbytes' NF4 with
``compress_statistics``); what ``lorakit train --quantize nf4`` uses."""


def bits_per_parameter(config: NFConfig) -> float:
    """What one weight costs in storage under ``config``: ``b + b0/B0 + b1/(B0 B1)``, or ``b + 32/B0``
    without double quantization (see the module docstring)."""
    if config.scale_bits is None:
        return config.bits + 32 / config.block_size
    second_level_bits = torch.finfo(SCALE_DTYPES[config.scale_dtype]).bits
    return (config.bits + config.scale_bits / config.block_size
            + second_level_bits / (config.block_size * config.scale_block_size))
