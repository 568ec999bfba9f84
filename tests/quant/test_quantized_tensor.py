"""Blockwise NF quantization of a weight: exact cases, error bounds, double quantization, padding."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ModelError
from lorakit.quant import NFConfig, code_book, quantize_nf
from lorakit.quant.nf_config import SCALE_DTYPES
from lorakit.quant.normal_float import largest_gap


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _per_value(scales: torch.Tensor, block_size: int, count: int) -> torch.Tensor:
    return scales.repeat_interleave(block_size)[:count]


def test_code_book_entries_times_absmax_dequantize_exactly():
    book = code_book(4)
    blocks = torch.stack([book * 0.5, book.flip(0) * 3.0, torch.zeros(16)])  # three blocks of 16
    quantized = quantize_nf(blocks, NFConfig(bits=4, block_size=16))
    assert quantized.scales.tolist() == [0.5, 3.0, 0.0]
    assert torch.equal(quantized.dequantize(), blocks)


@pytest.mark.parametrize(("bits", "block_size"), [(2, 16), (3, 32), (4, 64), (4, 256), (8, 128)])
def test_every_value_is_within_half_the_largest_gap_times_its_block_absmax(bits, block_size):
    weight = _weight(37, 29)  # 1073 values: the last block is padded
    quantized = quantize_nf(weight, NFConfig(bits=bits, block_size=block_size))
    bound = largest_gap(bits) / 2 * _per_value(quantized.scales, block_size, weight.numel()) * (1 + 1e-6)
    error = (quantized.dequantize() - weight).reshape(-1).abs()
    assert quantized.dequantize().shape == weight.shape
    assert bool((error <= bound).all())
    assert error.max() > 0  # a random weight is not on the grid


@pytest.mark.parametrize(("scale_bits", "scale_block_size", "scale_dtype"),
                         [(8, 256, "fp32"), (4, 64, "fp16"), (2, 16, "bf16"), (3, 16, "fp32")])
def test_double_quant_scales_and_weights_stay_within_their_bounds(scale_bits, scale_block_size, scale_dtype):
    weight = _weight(96, 100, seed=1)  # 150 blocks of 64
    exact = quantize_nf(weight, NFConfig())
    config = NFConfig(scale_bits=scale_bits, scale_block_size=scale_block_size, scale_dtype=scale_dtype)
    double = quantize_nf(weight, config)
    assert torch.equal(double.codes, exact.codes)  # weight codes come from the exact absmax, as in bitsandbytes
    true, stored = exact.scales, double.absmax()
    second_level = double.scale_scales.float().repeat_interleave(scale_block_size)[:true.numel()]
    rounding = torch.finfo(SCALE_DTYPES[scale_dtype]).eps * second_level  # t_k rounded to its dtype
    assert bool(((stored - true).abs() <= largest_gap(scale_bits) / 2 * second_level + rounding + 1e-7).all())
    per_value = _per_value(true, 64, weight.numel())
    bound = largest_gap(4) / 2 * per_value + _per_value((stored - true).abs(), 64, weight.numel()) + 1e-6
    assert bool(((double.dequantize() - weight).reshape(-1).abs() <= bound).all())


def test_dequantize_returns_the_requested_dtype_of_the_float32_values():
    quantized = quantize_nf(_weight(8, 64).to(torch.bfloat16), NFConfig())
    assert torch.equal(quantized.dequantize(torch.bfloat16), quantized.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("weight", [torch.tensor([[1.0, float("nan")]]), torch.zeros(0, 4),
                                    torch.ones(2, 2, dtype=torch.int64)])
def test_weights_that_cannot_be_quantized_are_refused(weight):
    with pytest.raises(ModelError, match="cannot quantize"):
        quantize_nf(weight, NFConfig())
