"""Intruder dimensions, spectra and subspace overlap on constructed matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analysis.deltas import DenseDelta, LowRankDelta
from lorakit.analysis.intruders import counts_over, scan_intruders
from lorakit.analysis.overlap import delta_overlap, subspace_overlap
from lorakit.analysis.spectrum import effective_rank, numerical_rank, spectrum_summary


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0]


def base_matrix(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_0 = U diag(σ) Vᵀ`` with well separated singular values 10, 9, ..."""
    k = min(d_out, d_in)
    U, V = orthonormal(d_out, k, seed), orthonormal(d_in, k, seed + 1)
    sigma = torch.linspace(10.0, 1.0, k, dtype=torch.float64)
    return U * sigma @ V.T, U, V


def test_a_rank_one_update_outside_the_base_column_space_is_exactly_one_intruder_at_every_epsilon():
    W0, U, V = base_matrix(32, 24)
    outside = torch.linalg.qr(torch.cat([U, torch.randn(32, 1, dtype=torch.float64)], dim=1))[0][:, -1]
    # Along W_0's weakest input direction (σ = 1) and stronger than σ_1 = 10: W_t's first direction is
    # (u_24 + 20 u_out) / sqrt(401), whose largest cosine with a base vector is 1 / sqrt(401).
    delta = 20.0 * torch.outer(outside, V[:, -1])
    scan = scan_intruders(W0, delta, top_k=10)
    assert float(scan.max_cosines[0]) == pytest.approx(1 / math.sqrt(401), abs=1e-5)
    assert scan.intruders(0.5) == [0] and float(scan.max_cosines[1:].min()) > 0.999
    assert counts_over([scan], [0.01, 0.1, 0.5, 0.9]) == [0, 1, 1, 1]


def test_a_direction_mixing_four_lower_base_directions_is_an_intruder_only_above_cosine_one_half():
    W0, U, V = base_matrix(24, 24)
    mixed = U[:, 12:16].sum(dim=1) / 2.0  # max |cos| with any base vector = 1/2
    delta = 30.0 * torch.outer(mixed, V[:, 20])
    scan = scan_intruders(W0, delta, top_k=10)
    assert scan.max_cosines[0] == pytest.approx(0.5, abs=0.01)  # W_0 tilts it slightly
    assert scan.count(0.45) == 0 and scan.count(0.55) == 1


def test_a_small_perturbation_of_the_base_creates_no_intruder_and_counts_grow_with_epsilon():
    W0, _, _ = base_matrix(40, 30)
    noise = 1e-3 * torch.randn(40, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scan = scan_intruders(W0, noise, top_k=10)
    assert scan.count(0.5) == 0 and float(scan.max_cosines.min()) > 0.99
    counts = counts_over([scan_intruders(W0, 8.0 * torch.randn(40, 30, dtype=torch.float64) / 6, top_k=10)],
                         [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    assert counts == sorted(counts) and counts[-1] == 10


def test_the_spectrum_of_a_known_b_a_and_its_summary():
    U, V = orthonormal(20, 3, 1), orthonormal(12, 3, 2)
    delta = LowRankDelta(B=U * torch.tensor([6.0, 6.0, 6.0], dtype=torch.float64), A=V.T)
    _, singular_values, _ = delta.svd()
    assert torch.allclose(singular_values, torch.tensor([6.0, 6.0, 6.0], dtype=torch.float64))
    summary = spectrum_summary(singular_values, delta.shape, base_norm=2.0)
    assert summary["effective_rank"] == pytest.approx(3.0)
    assert summary["rank"] == 3 and summary["norm"] == pytest.approx(6.0 * math.sqrt(3))
    assert summary["relative_norm"] == pytest.approx(3.0 * math.sqrt(3))
    dense_values = DenseDelta(delta.dense()).svd()[1]
    assert numerical_rank(dense_values, (20, 12)) == 3
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_the_low_rank_svd_equals_the_dense_one():
    gen = torch.Generator().manual_seed(3)
    delta = LowRankDelta(torch.randn(15, 4, generator=gen, dtype=torch.float64),
                         torch.randn(4, 9, generator=gen, dtype=torch.float64))
    u, s, vh = delta.svd()
    assert torch.allclose(u * s @ vh, delta.dense(), atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(delta.dense())[:4], atol=1e-10)


def test_subspace_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    basis = orthonormal(16, 6, 4)
    assert subspace_overlap(basis[:, :3], basis[:, :3] @ orthonormal(3, 3, 9)) == pytest.approx(1.0)
    assert subspace_overlap(basis[:, :3], basis[:, 3:]) == pytest.approx(0.0, abs=1e-12)
    first = LowRankDelta(basis[:, :2], orthonormal(8, 2, 5).T)
    second = LowRankDelta(basis[:, 2:4], orthonormal(8, 2, 5).T)
    assert delta_overlap(first, second, rank=2) == pytest.approx({"left": 0.0, "right": 1.0}, abs=1e-10)
