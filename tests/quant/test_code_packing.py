"""Tight k-bit packing: round trips at every width and length, and the documented bit layouts."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant.code_packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])  # 2, 4, 8: the byte-wise unpacking; the rest: words
@pytest.mark.parametrize("count", [1, 3, 7, 13, 64, 101])
def test_round_trip_for_lengths_not_divisible_by_the_pack_or_block(bits, count):
    codes = torch.randint(0, 2 ** bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_four_bits_put_the_first_code_in_the_high_nibble():
    assert pack_codes(torch.tensor([1, 2, 15], dtype=torch.uint8), 4).tolist() == [0x12, 0xF0]


def test_two_bits_fill_a_byte_from_the_top():
    assert pack_codes(torch.tensor([3, 0, 1, 2, 1], dtype=torch.uint8), 2).tolist() == [0b11000110, 0b01000000]


def test_three_bits_form_one_stream_across_bytes():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)  # 001 010 011 100 101 110 111 000
    assert pack_codes(codes, 3).tolist() == [0b00101001, 0b11001011, 0b10111000]


def test_eight_bits_are_one_code_per_byte():
    codes = torch.tensor([0, 255, 17], dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, 8), codes)
