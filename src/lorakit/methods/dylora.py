"""DyLoRA (Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation", EACL 2023): one training run serves every rank.

Each step samples ``b ~ U{1..r}`` (one ``b`` for every layer) and trains the truncated adapter
``h = W0 x + s_b B[:, :b] A[:b] x`` with ``s_b = alpha / b`` (``alpha / sqrt(b)`` with rsLoRA), so the
first ``b`` components must work on their own at every ``b``. In the *frozen* mode (the released
callback's) the first ``b - 1`` components are detached and only component ``b`` learns; otherwise all
``b`` learn (nested dropout). Afterwards the adapter is evaluated at any rank without retraining
(:func:`at_rank`) and exported at a chosen rank (:func:`truncate_adapter`); at ``b = r`` it is plain LoRA.
A layer whose own rank is below ``b`` (rank patterns, EVA) uses all its components.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lorakit.core.adapter import NestedRank
from lorakit.core.state import lora_layers
from lorakit.errors import AdapterError, ConfigError, StateError
from lorakit.io.adapters import read_adapter, write_adapter_files
from lorakit.methods.component import TrainingComponent


def _adapters(model: nn.Module, name: str):
    found = [(layer, layer.adapters[name]) for _, layer in lora_layers(model) if name in layer.adapters]
    if not found:
        raise AdapterError(f"the model holds no adapter {name!r}")
    return found


def max_rank(model: nn.Module, name: str = "default") -> int:
    """The largest rank of adapter ``name`` over the model's layers (DyLoRA's ``r_max``)."""
    return max(adapter.rank for _, adapter in _adapters(model, name))


def set_nested_rank(model: nn.Module, rank: int | None, *, frozen: bool = False, name: str = "default") -> None:
    """Truncate adapter ``name`` to its first ``rank`` components everywhere (None: the full rank)."""
    found = _adapters(model, name)
    if rank is not None and not (isinstance(rank, int) and 1 <= rank):
        raise ConfigError(f"rank={rank!r} is invalid: a positive integer (at most {max_rank(model, name)})")
    if any(layer.merged for layer, _ in found):
        raise StateError("unmerge the model's adapters before changing adapter "
                         f"{name!r}'s rank; a merged delta must stay the one that was merged")
    for _, adapter in found:
        adapter.nested = None if rank is None else NestedRank(rank, frozen)


@contextmanager
def at_rank(model: nn.Module, rank: int, name: str = "default") -> Iterator[nn.Module]:
    """Inside the block adapter ``name`` runs at rank ``rank`` (for evaluation); afterwards at full rank."""
    set_nested_rank(model, rank, name=name)
    try:
        yield model
    finally:
        set_nested_rank(model, None, name=name)


def sample_rank(seed: int, step: int, rank: int) -> int:
    """Step ``step``'s rank ``b ~ U{1..rank}``, a pure function of ``(seed, step)`` so resume is exact."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(1, rank + 1, (1,), generator=generator))


class DyLoraSampler(TrainingComponent):
    """Samples the step's rank before it and restores the full rank after it (so evaluation between
    steps, and the saved adapter, see the whole adapter)."""

    def __init__(self, *, seed: int, frozen: bool = False, name: str = "default") -> None:
        self.seed, self.frozen, self.name = seed, frozen, name
        self.model: nn.Module | None = None
        self.rank = 0

    def attach(self, model: nn.Module) -> None:
        self.model, self.rank = model, max_rank(model, self.name)

    def before_step(self, step: int, total: int) -> None:
        set_nested_rank(self.model, sample_rank(self.seed, step, self.rank), frozen=self.frozen, name=self.name)

    def after_step(self, step: int, total: int) -> None:
        set_nested_rank(self.model, None, name=self.name)


def truncate_adapter(path: str | Path, rank: int, out: str | Path) -> Path:
    """Write the adapter at ``path`` truncated to its first ``rank`` components to ``out`` (PEFT format,
    atomically): ``A[:rank]``, ``B[:, :rank]``, rank patterns capped at ``rank``, alpha kept, so PEFT's
    scale ``alpha / rank`` is DyLoRA's ``s_b``. Other settings of the config are kept as they were."""
    config, raw, tensors = read_adapter(path)
    largest = max([config.rank, *config.rank_pattern.values()])
    if not (isinstance(rank, int) and 1 <= rank <= largest):
        raise ConfigError(f"rank={rank!r} is invalid: an integer in [1, {largest}] (the adapter's rank)")
    truncated = {key: value[:rank] if ".lora_A." in key or ".lora_embedding_A" in key else value[:, :rank]
                 for key, value in tensors.items()}
    raw = {**raw, "r": min(rank, config.rank),
           "rank_pattern": {key: min(rank, value) for key, value in (raw.get("rank_pattern") or {}).items()}}
    directory = Path(out)
    write_adapter_files(directory, {k: v.contiguous() for k, v in truncated.items()}, raw,
                        origin=f"dylora export at rank {rank}")
    return directory
