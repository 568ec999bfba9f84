"""LQ-LoRA's decomposition W ~= Q + L1 L2 (plain and Fisher-weighted) and its bit allocation ILP."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.init.lq_lora import (
    SMALL_GRID,
    allocate,
    allocate_in_chunks,
    decompose,
    mixed_configs,
    mixed_decompositions,
)
from lorakit.init.lq_lora.cost_cache import costs_key, remembered_costs
from lorakit.quant import NFConfig, bits_per_parameter, quantize_nf

NF3 = NFConfig(bits=3, block_size=64)


def low_rank_plus_noise(seed: int = 0, rank: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(96, rank, generator=generator) @ torch.randn(rank, 128, generator=generator)  # (96, 128)
    return 0.1 * low + 0.02 * torch.randn(96, 128, generator=generator)


def weighted_error(weight, decomposition, fisher) -> float:
    remainder = weight - decomposition.L1 @ decomposition.L2 - decomposition.quantized.dequantize()
    return float(torch.linalg.norm(fisher.sqrt() * remainder))


def test_the_error_falls_across_kept_iterations_and_beats_plain_quantization():
    weight = low_rank_plus_noise()
    result = decompose(weight, 6, NF3)
    kept = result.errors[: result.best + 1]
    assert len(kept) > 1
    assert all(later < earlier for earlier, later in itertools.pairwise(kept))
    plain = float(torch.linalg.norm(weight - quantize_nf(weight, NF3).dequantize()))
    assert result.error < 0.5 * plain
    reconstruction = result.quantized.dequantize() + result.L1 @ result.L2
    assert float(torch.linalg.norm(weight - reconstruction)) == pytest.approx(result.error, rel=1e-5)


def test_rank_zero_is_plain_quantization():
    weight = low_rank_plus_noise(seed=1)
    result = decompose(weight, 0, NF3)
    assert result.L1.shape == (96, 0) and result.L2.shape == (0, 128)
    assert torch.equal(result.quantized.dequantize(), quantize_nf(weight, NF3).dequantize())


def test_low_rank_plus_an_exactly_representable_matrix_is_recovered():
    generator = torch.Generator().manual_seed(2)
    representable = quantize_nf(0.1 * torch.randn(64, 64, generator=generator), NF3).dequantize()  # exactly NF3
    low = torch.randn(64, 2, generator=generator) @ torch.randn(2, 64, generator=generator)  # rank 2
    weight = representable + low
    result = decompose(weight, 2, NF3)
    plain = float(torch.linalg.norm(weight - quantize_nf(weight, NF3).dequantize()))
    assert result.error < 0.05 * plain
    assert float(torch.linalg.norm(result.L1 @ result.L2 - low)) < 0.02 * float(torch.linalg.norm(low))


def test_the_fisher_weighted_decomposition_has_the_lower_weighted_error():
    weight = low_rank_plus_noise(seed=3)
    generator = torch.Generator().manual_seed(3)
    rows = torch.logspace(-3, 2, 96)[torch.randperm(96, generator=generator)]  # strongly non-uniform
    columns = torch.logspace(-2, 1, 128)[torch.randperm(128, generator=generator)]
    fisher = rows[:, None] * columns[None, :]  # (96, 128)
    weighted = decompose(weight, 4, NF3, fisher=fisher)
    unweighted = decompose(weight, 4, NF3)
    assert weighted.error == pytest.approx(weighted_error(weight, weighted, fisher), rel=1e-5)
    assert weighted.error < 0.9 * weighted_error(weight, unweighted, fisher)


def brute_force(costs, bits, numels, budget) -> tuple[int, ...]:
    feasible = [choice for choice in itertools.product(range(len(bits)), repeat=len(numels))
                if sum(bits[c] * n for c, n in zip(choice, numels, strict=True)) <= budget * sum(numels)]
    return min(feasible, key=lambda choice: sum(costs[i][c] for i, c in enumerate(choice)))


@pytest.mark.parametrize("budget", [2.5, 2.75, 3.0, 3.25, 4.0])
def test_the_allocation_is_the_brute_force_optimum_within_the_budget(budget):
    bits = [2.0, 3.0, 4.0]
    numels = [100, 300]
    costs = [[9.0, 4.0, 1.0], [30.0, 12.0, 2.0]]  # the big matrix gains more per bit
    chosen = allocate(costs, bits, numels, budget)
    assert tuple(chosen) == brute_force(costs, bits, numels, budget)
    assert sum(bits[c] * n for c, n in zip(chosen, numels, strict=True)) <= budget * sum(numels)


def test_chunked_allocation_keeps_each_chunk_within_the_budget_at_no_lower_cost():
    bits = [2.0, 3.0, 4.0]
    numels = [100, 300, 200, 100]
    costs = [[9.0, 4.0, 1.0], [30.0, 12.0, 2.0], [1.0, 0.9, 0.8], [50.0, 10.0, 1.0]]
    budget = 3.0
    whole = allocate(costs, bits, numels, budget)
    assert allocate_in_chunks(costs, bits, numels, budget, 1) == whole
    chunked = allocate_in_chunks(costs, bits, numels, budget, 2)  # matrices 0-1, then 2-3
    assert tuple(chunked[:2]) == brute_force(costs[:2], bits, numels[:2], budget)
    assert tuple(chunked[2:]) == brute_force(costs[2:], bits, numels[2:], budget)
    for first, last in ((0, 2), (2, 4)):
        assert sum(bits[c] * n for c, n in zip(chunked[first:last], numels[first:last], strict=True)) <= (
            budget * sum(numels[first:last]))
    def total(chosen):
        return sum(costs[i][c] for i, c in enumerate(chosen))
    assert total(chunked) >= total(whole)


@pytest.mark.parametrize(("chunks", "message"), [(0, "a positive integer is required"), (5, "use at most 4")])
def test_an_impossible_chunk_count_is_refused(chunks, message):
    with pytest.raises(ConfigError, match=message):
        allocate_in_chunks([[1.0]] * 4, [2.0], [10] * 4, 2.0, chunks)


def test_an_infeasible_budget_names_the_minimum():
    with pytest.raises(ConfigError, match="minimum feasible budget") as error:
        allocate([[1.0, 0.5]], [2.126, 4.5], [64], 2.0)
    assert "2.126" in str(error.value)


def test_mixed_configs_meet_the_budget_and_give_the_important_matrix_more_bits():
    generator = torch.Generator().manual_seed(4)
    weights = {"small": 0.01 * torch.randn(64, 64, generator=generator),
               "large": torch.randn(64, 64, generator=generator)}
    budget = 3.0
    chosen = mixed_decompositions(weights, {"small": 2, "large": 2}, SMALL_GRID, budget, progress=False)
    used = [bits_per_parameter(d.quantized.config) for d in chosen.values()]
    assert sum(used) / 2 <= budget
    assert chosen["large"].quantized.config.bits > chosen["small"].quantized.config.bits


def _sweep_inputs(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    weights = {"a": torch.randn(32, 64, generator=generator), "b": torch.randn(64, 32, generator=generator)}
    return weights, {"a": 2, "b": 2}


def test_the_cost_sweep_is_remembered_and_reused_for_another_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    weights, ranks = _sweep_inputs()
    first = mixed_decompositions(weights, ranks, SMALL_GRID, 4.0, max_iterations=2, progress=False)
    stored = list((tmp_path / "lq-lora-costs").glob("*.json"))
    assert len(stored) == 1
    swept = []
    monkeypatch.setattr(mixed_configs, "decomposition_costs", lambda *a, **k: swept.append(1) or [])
    again = mixed_decompositions(weights, ranks, SMALL_GRID, 3.0, max_iterations=2, progress=False)
    assert not swept  # the remembered table served the second budget
    assert [d.quantized.config for d in first.values()] != [d.quantized.config for d in again.values()]


def test_a_remembered_sweep_is_keyed_by_every_input_and_a_corrupt_one_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    weights, ranks = _sweep_inputs()
    key = costs_key(weights, ranks, SMALL_GRID, None, 2)
    changed = {**weights, "b": weights["b"] + 1e-6}
    assert key != costs_key(changed, ranks, SMALL_GRID, None, 2)
    assert key != costs_key(weights, {**ranks, "b": 3}, SMALL_GRID, None, 2)
    assert key != costs_key(weights, ranks, SMALL_GRID[:4], None, 2)
    assert key != costs_key(weights, ranks, SMALL_GRID, None, 3)
    assert key != costs_key(weights, ranks, SMALL_GRID, {n: torch.ones_like(w) for n, w in weights.items()}, 2)
    path = tmp_path / "lq-lora-costs" / f"{key}.json"
    path.parent.mkdir(parents=True)
    path.write_text("[[1.0, NaN]]")
    assert remembered_costs(key, 2, 2, lambda: [[1, 2], [3, 4]]) == [[1.0, 2.0], [3.0, 4.0]]
    assert remembered_costs(key, 2, 2, lambda: pytest.fail("the stored table should serve")) == [[1.0, 2.0], [3.0, 4.0]]
