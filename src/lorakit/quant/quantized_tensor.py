"""A weight stored as blockwise NormalFloat codes: :class:`NFTensor` and :func:`quantize_nf`.

With ``B0`` weights per block (QLoRA: Dettmers et al. 2023) a weight ``W`` of ``n`` values becomes
``m = ceil(n / B0)`` blocks of ``b``-bit codes and one absmax ``s_j`` each:

    W_ji ~= NF_b[codes_ji] * s_j

Double quantization (bitsandbytes' at its defaults: 8 bits, blocks of 256, mean subtracted; LQ-LoRA:
Guo et al., ICLR 2024, for b0 in {2, 3, 4, 8}, B1 in {16, 64, 256}, b1 in {fp32, fp16, bf16})
stores the scales themselves as ``b0``-bit NormalFloat codes in blocks of ``B1`` around their mean
``mu``, each block with a ``b1``-bit float scale ``t_k``:

    s_j ~= NF_b0[scale_codes_j] * t_k + mu        (j in block k)

The weight codes are computed against the exact absmax (as bitsandbytes does), so a weight's error is
at most half the code book's largest gap times ``s_j``, plus the error of ``s_j`` itself. Dequantizing
computes exactly what is stored: float32 products, then the requested dtype. (bitsandbytes' second
level uses its 8-bit dynamic code, not NF8, so lorakit's double-quantized scales differ from it
slightly; without double quantization NF4 is identical.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorakit.errors import ConfigError, FormatError, ModelError
from lorakit.quant.blockwise import dequantize_blocks, quantize_blocks
from lorakit.quant.code_packing import packed_size
from lorakit.quant.nf_config import SCALE_DTYPES, NFConfig

OPTIONAL_PARTS = ("scale_scales", "scale_offset")
"""The parts only a double-quantized tensor has."""


def part_dtypes(config: NFConfig) -> dict[str, torch.dtype]:
    """The dtype of every tensor an :class:`NFTensor` under ``config`` stores, by part name."""
    if config.scale_bits is None:
        return {"codes": torch.uint8, "scales": torch.float32}
    return {"codes": torch.uint8, "scales": torch.uint8,
            "scale_scales": SCALE_DTYPES[config.scale_dtype], "scale_offset": torch.float32}


@dataclass(frozen=True, eq=False)
class NFTensor:
    """A quantized weight: its packed codes, its scales (see the module docstring) and how to read them."""

    codes: torch.Tensor
    """uint8, (packed_size(m B0, b),): the weight codes of every padded block."""
    scales: torch.Tensor
    """float32 absmax per block (m,); with double quantization uint8 packed b0-bit codes of them."""
    scale_scales: torch.Tensor | None
    """Double quantization: one scale per block of B1 scales, (ceil(m / B1),) in the config's scale dtype."""
    scale_offset: torch.Tensor | None
    """Double quantization: the mean ``mu`` subtracted from the scales, float32 (1,)."""
    shape: tuple[int, ...]
    config: NFConfig

    @property
    def block_count(self) -> int:
        """``m``: the blocks of ``B0`` weights (the last one padded)."""
        return -(-math.prod(self.shape) // self.config.block_size)

    @property
    def scale_block_count(self) -> int:
        """The blocks of ``B1`` absmax scales under double quantization."""
        return -(-self.block_count // self.config.scale_block_size)

    def absmax(self) -> torch.Tensor:
        """The scale ``s_j`` of every block, float32 (m,), as the weight's dequantization uses it."""
        config = self.config
        if config.scale_bits is None:
            return self.scales
        centred = dequantize_blocks(self.scales, self.scale_scales, config.scale_bits, config.scale_block_size)
        return centred[:self.block_count] + self.scale_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, of ``shape``, computed in float32 and returned in ``dtype``."""
        values = dequantize_blocks(self.codes, self.absmax(), self.config.bits, self.config.block_size)
        return values[:math.prod(self.shape)].view(self.shape).to(dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors this weight stores, by part name (what a file holds)."""
        optional = {"scale_scales": self.scale_scales, "scale_offset": self.scale_offset}
        return {"codes": self.codes, "scales": self.scales,
                **{name: part for name, part in optional.items() if part is not None}}

    @property
    def nbytes(self) -> int:
        """The bytes this weight really stores (codes, scales, second-level scales and offset)."""
        return sum(part.nbytes for part in self.parts().values())

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], config: NFConfig,
                   where: str) -> NFTensor:
        """An :class:`NFTensor` from stored parts, every one checked; a :class:`FormatError` names ``where``
        and the part: missing or extra parts, wrong dtype or size, non-finite scales."""
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise FormatError(f"{where}: shape {list(shape)} is not a list of positive integers")
        dtypes = part_dtypes(config)
        if set(parts) != set(dtypes):
            raise FormatError(f"{where}: holds the parts {sorted(parts)}, but a tensor quantized with "
                              f"scale_bits={config.scale_bits} has exactly {sorted(dtypes)}")
        tensor = cls(parts["codes"], parts["scales"], parts.get("scale_scales"), parts.get("scale_offset"),
                     tuple(shape), config)
        for name, size in tensor._part_sizes().items():
            part = parts[name]
            if part.dtype != dtypes[name] or part.shape != (size,):
                raise FormatError(f"{where}.{name}: is {part.dtype} of shape {list(part.shape)}, expected "
                                  f"{dtypes[name]} of shape [{size}] for shape {list(shape)} under {config}")
            if part.is_floating_point() and not torch.isfinite(part).all():
                raise FormatError(f"{where}.{name}: holds non-finite values (NaN or inf)")
        return tensor

    def _part_sizes(self) -> dict[str, int]:
        config = self.config
        codes = packed_size(self.block_count * config.block_size, config.bits)
        if config.scale_bits is None:
            return {"codes": codes, "scales": self.block_count}
        return {"codes": codes,
                "scales": packed_size(self.scale_block_count * config.scale_block_size, config.scale_bits),
                "scale_scales": self.scale_block_count, "scale_offset": 1}


def quantize_nf(weight: torch.Tensor, config: NFConfig) -> NFTensor:
    """``weight`` (a non-empty, finite float tensor of any shape, read flat) as an :class:`NFTensor`."""
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ModelError(f"cannot quantize a {weight.dtype} tensor of shape {list(weight.shape)}: "
                         "NF quantization takes a non-empty float tensor")
    if not torch.isfinite(weight).all():
        raise ModelError(f"cannot quantize a weight of shape {list(weight.shape)} holding NaN or inf")
    codes, absmax = quantize_blocks(weight.detach(), config.bits, config.block_size)  # absmax: (m,)
    if config.scale_bits is None:
        return NFTensor(codes, absmax, None, None, tuple(weight.shape), config)
    offset = absmax.mean().reshape(1)  # (1,)
    scale_codes, scale_scales = quantize_blocks(absmax - offset, config.scale_bits, config.scale_block_size,
                                                SCALE_DTYPES[config.scale_dtype])
    if not torch.isfinite(scale_scales).all():
        raise ConfigError(f"NFConfig.scale_dtype={config.scale_dtype!r} cannot hold this weight's second-level "
                          f"scales (up to {float((absmax - offset).abs().max()):g}); use 'bf16' or 'fp32'")
    return NFTensor(codes, scale_codes, scale_scales, offset, tuple(weight.shape), config)
