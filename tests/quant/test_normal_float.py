"""The NF-k code books: bitsandbytes' NF4 exactly, and the construction's invariants at every k."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant.normal_float import BITS, code_book, largest_gap, nearest_codes

# bitsandbytes' published NF4 table (bitsandbytes/functional.py, the "nf4" entry of get_4bit_type; the same
# 16 values are hard-coded in its CPU and CUDA dequantize kernels), as float32.
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_is_bitsandbytes_table_bit_for_bit():
    assert torch.equal(code_book(4), torch.tensor(BITSANDBYTES_NF4, dtype=torch.float32))


@pytest.mark.parametrize("bits", BITS)
def test_code_book_is_sorted_from_minus_one_to_one_with_an_exact_zero(bits):
    book = code_book(bits)
    assert book.dtype == torch.float32 and book.numel() == 2 ** bits
    assert bool((torch.diff(book) > 0).all())
    assert book[0].item() == -1.0 and book[-1].item() == 1.0
    assert (book == 0).sum().item() == 1
    # asymmetric: one more positive entry than negative ones
    assert (book > 0).sum().item() == 2 ** (bits - 1) and (book < 0).sum().item() == 2 ** (bits - 1) - 1


def test_nf2_by_hand():
    # p = 0.9677083: positives Phi^-1(p), Phi^-1((p + 0.5) / 2); one negative -Phi^-1(p); all over Phi^-1(p)
    outer = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    middle = torch.special.ndtri(torch.tensor((0.9677083 + 0.5) / 2, dtype=torch.float64))
    expected = torch.tensor([-1.0, 0.0, (middle / outer).item(), 1.0])
    assert torch.allclose(code_book(2), expected, atol=1e-6)


def test_nearest_codes_rounds_to_the_nearest_entry_ties_to_the_lower():
    book = code_book(4)
    midpoint = (book[7] + book[8]) / 2
    values = torch.stack([book[3], book[3] + 1e-4, midpoint, midpoint + 1e-6, torch.tensor(1.5), torch.tensor(-2.0)])
    assert nearest_codes(values, 4).tolist() == [3, 3, 7, 8, 15, 0]


@pytest.mark.parametrize("bits", BITS)
def test_nearest_codes_picks_the_closest_entry_of_random_values(bits):
    values = torch.rand(500, generator=torch.Generator().manual_seed(bits)) * 2 - 1
    book = code_book(bits)
    chosen = book[nearest_codes(values, bits).long()]
    best = (values[:, None] - book[None, :]).abs().min(dim=1).values
    assert torch.allclose((values - chosen).abs(), best)
    assert bool(((values - chosen).abs() <= largest_gap(bits) / 2 + 1e-7).all())


def test_unknown_width_is_refused():
    with pytest.raises(ValueError, match="bits=5"):
        code_book(5)
