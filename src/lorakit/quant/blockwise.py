"""One level of blockwise absmax quantization onto a NormalFloat code book (QLoRA: Dettmers et al. 2023).

``n`` values are cut into blocks of ``B`` (the last block padded with zeros); block ``j`` keeps its absmax
``s_j = max_i |x_ji|`` (rounded to the scale dtype) and, for each value, the index of the nearest code
entry to ``x_ji / s_j``:

    codes_ji = nearest(x_ji * (1 / s_j))        x_ji ~= code_book[codes_ji] * s_j

A block of zeros has ``s_j = 0`` and codes the entry 0. The division is a multiplication by the
reciprocal, as in bitsandbytes, so that NF4 codes match it bit for bit. The same level quantizes the
weights and, under double quantization, the absmax scales themselves (LQ-LoRA: Guo et al., ICLR 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.quant.code_packing import pack_codes, unpack_codes
from lorakit.quant.normal_float import code_book, nearest_codes


def quantize_blocks(values: torch.Tensor, bits: int, block_size: int,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes, scales)`` of ``values`` (any shape, read flat): uint8 codes of every padded block,
    and one absmax per block in ``scale_dtype``; codes are computed against the scale as stored."""
    flat = values.reshape(-1).float()
    blocks = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)  # (n_blocks, B)
    scales = blocks.abs().amax(dim=1).to(scale_dtype)  # (n_blocks,)
    stored = scales.float()
    inverse = torch.where(stored > 0, 1.0 / stored, 0.0)  # (n_blocks,); a zero block codes the entry 0
    return pack_codes(nearest_codes(blocks * inverse[:, None], bits), bits), scales


def dequantize_blocks(packed: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """The float32 values of every padded block, shape (len(scales) * block_size,): ``code_book[code] * s``."""
    codes = unpack_codes(packed, bits, scales.numel() * block_size).view(-1, block_size)  # (n_blocks, B)
    book = code_book(bits).to(packed.device)
    return (book[codes.long()] * scales.float()[:, None]).reshape(-1)
