"""LQ-LoRA's cost sweep, remembered on disk: the sweep (every matrix decomposed under every candidate config) is
the slow part of ``--init lq-lora``, and it depends only on the weights, the ranks, the grid, the Fisher weights
and the iteration count, not on the bit budget. So trying another ``--bits`` on the same base costs one integer
program, not another sweep.

The costs live in ``$LORAKIT_HOME/lq-lora-costs/<key>.json``, the key a SHA-256 over every input's bytes; a file
that does not hold a finite (matrices, configs) table is ignored and recomputed, and a cache that cannot be written
only warns. Under torch.distributed the ranks sweep together, so they use the stored table only when every rank
finds it, and rank 0 writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lorakit.io.files import save_json
from lorakit.models.home import lorakit_home
from lorakit.parallel.process_group import current_ranks, sum_across_ranks
from lorakit.quant.nf_config import NFConfig

Costs = list[list[float]]


def costs_directory() -> Path:
    """Where remembered sweeps are kept."""
    return lorakit_home() / "lq-lora-costs"


def costs_key(weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], grid: Sequence[NFConfig],
              fisher: Mapping[str, torch.Tensor] | None, max_iterations: int) -> str:
    """A SHA-256 over the sweep's inputs: each weight's name, shape and bytes (and its Fisher weights), its rank,
    the grid's configs and the iteration count."""
    digest = hashlib.sha256()
    header = {"grid": [dataclasses.asdict(config) for config in grid], "iterations": max_iterations,
              "ranks": [[name, ranks[name]] for name in weights], "fisher": fisher is not None}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, weight in weights.items():
        for tensor in (weight, None if fisher is None else fisher[name]):
            if tensor is not None:
                tensor = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{name}{tuple(tensor.shape)}".encode())
                digest.update(tensor.numpy())  # the buffer, not a copy
    return digest.hexdigest()


def _valid(costs: object, rows: int, columns: int) -> bool:
    return (isinstance(costs, list) and len(costs) == rows
            and all(isinstance(row, list) and len(row) == columns for row in costs)
            and all(isinstance(value, float) and math.isfinite(value) for row in costs for value in row))


def remembered_costs(key: str, rows: int, columns: int, compute: Callable[[], Costs]) -> Costs:
    """The (``rows``, ``columns``) cost table stored under ``key``, or ``compute()``'s, stored for next time."""
    path = costs_directory() / f"{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = None
    missing = not _valid(stored, rows, columns)
    if not sum_across_ranks(torch.tensor([int(missing)])).item():  # every rank has it (ranks sweep together)
        return stored
    costs = [[float(value) for value in row] for row in compute()]
    if not current_ranks().main:
        return costs
    try:
        save_json(path, costs)  # creates the directory
    except OSError as error:
        warnings.warn(f"LQ-LoRA's cost sweep could not be remembered in {path} ({error}); the next run sweeps again",
                      stacklevel=2)
    return costs
