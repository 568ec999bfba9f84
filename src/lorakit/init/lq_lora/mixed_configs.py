"""LQ-LoRA's mixed-configuration step (Guo et al., ICLR 2024, Sec. 3.2): decompose every matrix under every
candidate config, choose one config per matrix under the bit budget, and keep those decompositions.

For matrix i and config c, ``cost_ic = ||sqrt(F_i) * (W_i - L1 L2 - Q)||_F^2`` after
:func:`~lorakit.init.lq_lora.decomposition.decompose` and ``storage_ic = bits_per_parameter(c) numel_i``;
:func:`~lorakit.init.lq_lora.allocation.allocate` picks the configs. Only the costs are kept during the
sweep; the chosen decompositions are computed once more (deterministically), so memory never holds more
than one candidate per matrix. Time: ``(configs + 1) x matrices`` decompositions, or ``matrices`` when the same
sweep was made before (:mod:`~lorakit.init.lq_lora.cost_cache` remembers it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from lorakit.init.lq_lora.allocation import allocate_in_chunks, check_chunks
from lorakit.init.lq_lora.cost_cache import costs_key, remembered_costs
from lorakit.init.lq_lora.decomposition import Decomposition, decompose
from lorakit.parallel.process_group import current_ranks, gather_rows
from lorakit.quant.nf_config import NFConfig, bits_per_parameter


def decomposition_costs(weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], grid: Sequence[NFConfig], *,
                        fisher: Mapping[str, torch.Tensor] | None = None, max_iterations: int = 100,
                        progress: bool = True) -> list[list[float]]:
    """``cost_ic``, the squared (Fisher-weighted) error of weight i decomposed under config c: (matrices, configs),
    the weights in ``weights``' order. The sweep is the slow part; budgets can share one.

    Under torch.distributed every rank passes the same weights, sweeps its share of the matrices
    (``Ranks.share``: matrices ``r, r + N, ...``) and gathers the others' rows, so each rank gets the whole table,
    the one a lone process computes (each decomposition is deterministic)."""
    names = list(weights)
    mine = current_ranks().share(range(len(names)))
    rows = []  # (own matrices, 1 + configs): the matrix's index, then its costs
    with tqdm(total=len(mine) * len(grid), disable=not progress, desc="lq-lora configs",
              unit="decomposition") as bar:
        for index in mine:
            row = [float(index)]
            for config in grid:
                row.append(_decompose(weights, ranks, names[index], config, fisher, max_iterations).error ** 2)
                bar.update()
            rows.append(row)
    swept = torch.cat(gather_rows(torch.tensor(rows, dtype=torch.float64).reshape(-1, 1 + len(grid))))
    by_index = {int(row[0]): row[1:].tolist() for row in swept}
    return [by_index[index] for index in range(len(names))]


def mixed_decompositions(weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], grid: Sequence[NFConfig],
                         budget: float, *, fisher: Mapping[str, torch.Tensor] | None = None,
                         max_iterations: int = 100, chunks: int = 1, costs: Sequence[Sequence[float]] | None = None,
                         progress: bool = True) -> dict[str, Decomposition]:
    """Each weight (out, in) by name, decomposed at rank ``ranks[name]`` under the config the bit
    allocation chose for it (``decomposition.quantized.config``); ``budget`` in bits per parameter, allocated over
    ``chunks`` consecutive groups of the weights (:func:`~lorakit.init.lq_lora.allocation.allocate_in_chunks`);
    ``costs`` from :func:`decomposition_costs` of the same arguments, when already computed (otherwise a sweep
    remembered from an earlier call with the same inputs, or a new one)."""
    names = list(weights)
    check_chunks(chunks, len(names))  # before the sweep, which takes long
    if costs is None:
        costs = remembered_costs(costs_key(weights, ranks, grid, fisher, max_iterations), len(names), len(grid),
                                 lambda: decomposition_costs(weights, ranks, grid, fisher=fisher,
                                                             max_iterations=max_iterations, progress=progress))
    chosen = allocate_in_chunks(costs, [bits_per_parameter(c) for c in grid], [weights[n].numel() for n in names],
                                budget, chunks)
    return {name: _decompose(weights, ranks, name, grid[index], fisher, max_iterations)
            for name, index in zip(names, chosen, strict=True)}


def _decompose(weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], name: str, config: NFConfig,
               fisher: Mapping[str, torch.Tensor] | None, max_iterations: int) -> Decomposition:
    return decompose(weights[name], ranks[name], config, fisher=None if fisher is None else fisher[name],
                     max_iterations=max_iterations)
