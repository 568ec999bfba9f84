"""Packing k-bit codes tightly into bytes: ``ceil(n k / 8)`` bytes for ``n`` codes.

The codes form one bit stream, most significant bit first: code 0 fills the top bits of byte 0. So at
4 bits byte ``j`` is ``code[2j] << 4 | code[2j + 1]`` (bitsandbytes' NF4 layout), at 2 bits four codes
share a byte (``c0 c0 c1 c1 c2 c2 c3 c3``), at 8 bits a byte is a code, and at 3 bits eight codes
share three bytes (``c0 c0 c0 c1 c1 c1 c2 c2 | c2 c3 ...``), a code crossing byte boundaries. Bits
after the last code are zero.

Unpacking at 2, 4 or 8 bits shifts and masks the bytes themselves (uint8, one pass: the path every forward
of a 4-bit layer takes). Otherwise, and always when packing, the stream is cut into chunks of ``lcm(k, 8)`` bits
(``L = lcm(k, 8) / k`` codes in ``lcm(k, 8) / 8`` bytes), each assembled in one int64 word. Every k-bit
pattern is a code of the ``2^k``-entry code book, so packed bytes can never hold an out-of-range code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count bits / 8)``."""
    return -(-count * bits // 8)


def _shifts(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each code and each byte of a chunk sit in its word, most significant first."""
    chunk_bits = math.lcm(bits, 8)
    code_shifts = torch.arange(chunk_bits - bits, -1, -bits)  # (L,)
    byte_shifts = torch.arange(chunk_bits - 8, -1, -8)  # (lcm / 8,)
    return code_shifts, byte_shifts


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (any shape, values below ``2^bits``) as a flat uint8 tensor of ``packed_size`` bytes."""
    code_shifts, byte_shifts = _shifts(bits)
    flat = codes.reshape(-1).long()
    chunks = F.pad(flat, (0, (-flat.numel()) % len(code_shifts))).view(-1, len(code_shifts))  # (chunks, L)
    words = (chunks << code_shifts.to(flat.device)).sum(dim=1)  # (chunks,)
    packed = (words[:, None] >> byte_shifts.to(flat.device)) & 0xFF  # (chunks, lcm / 8)
    return packed.to(torch.uint8).reshape(-1)[:packed_size(flat.numel(), bits)]


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of ``packed`` (as :func:`pack_codes` wrote them), as uint8 of shape (count,)."""
    if 8 % bits == 0:  # whole codes per byte (2, 4, 8 bits): shift the bytes themselves, no int64 words
        shifts = torch.arange(8 - bits, -1, -bits, dtype=torch.uint8, device=packed.device)  # (8 / bits,)
        return ((packed.reshape(-1)[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:count]
    code_shifts, byte_shifts = _shifts(bits)
    flat = packed.reshape(-1).long()
    chunks = F.pad(flat, (0, (-flat.numel()) % len(byte_shifts))).view(-1, len(byte_shifts))  # (chunks, lcm / 8)
    words = (chunks << byte_shifts.to(flat.device)).sum(dim=1)  # (chunks,)
    codes = (words[:, None] >> code_shifts.to(flat.device)) & (2 ** bits - 1)  # (chunks, L)
    return codes.reshape(-1)[:count].to(torch.uint8)
