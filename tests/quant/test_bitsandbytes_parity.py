"""lorakit's NF4 against bitsandbytes' on the CPU (bitsandbytes >= 0.50, the ``test`` extra)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorakit.quant import NFConfig, quantize_nf

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")


def _weight() -> torch.Tensor:
    return torch.randn(96, 128, generator=torch.Generator().manual_seed(0))  # 192 blocks of 64


def test_nf4_without_double_quant_equals_bitsandbytes_exactly():
    weight = _weight()
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", blocksize=64)
    ours = quantize_nf(weight, NFConfig(bits=4, block_size=64))
    assert torch.equal(ours.codes, packed.reshape(-1))  # same bytes: high nibble first
    assert torch.equal(ours.scales, state.absmax)
    assert torch.equal(ours.dequantize(), bnb.functional.dequantize_4bit(packed, state))


def test_nf4_with_double_quant_is_within_the_scale_error_of_bitsandbytes():
    """Both quantize the weights against the exact absmax (identical codes) and store the absmax scales
    mean-subtracted in 8 bits per block of 256; bitsandbytes codes them with its dynamic 8-bit map, lorakit
    with NF8. With identical codes c (|c| <= 1) the weights differ by |c| |s_ours - s_bnb| per block, and
    each side's scale error is at most half its code's gap next to the scale times the block's second-level
    scale: on this weight under 0.5% of the largest absmax for either."""
    weight = _weight()
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
    ours = quantize_nf(weight, NFConfig(bits=4, block_size=64, scale_bits=8, scale_block_size=256))
    assert torch.equal(ours.codes, packed.reshape(-1))
    theirs_absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    exact = quantize_nf(weight, NFConfig()).scales
    largest = float(exact.max())
    assert float((ours.absmax() - exact).abs().max()) < 0.005 * largest
    assert float((theirs_absmax - exact).abs().max()) < 0.005 * largest
    difference = (ours.dequantize() - bnb.functional.dequantize_4bit(packed, state)).abs()
    assert float(difference.max()) <= float((ours.absmax() - theirs_absmax).abs().max()) + 1e-6
    assert float(difference.max()) < 0.01 * largest
