"""How a forward pass says which adapters run, and with which weights.

One :class:`RoutingState` is shared by every wrapped layer of a model. It holds the model's standing
choice (the active adapters with static weights, possibly negative) and, for the duration of one
call, an override in one of three forms: one adapter per batch row (mixed batches), dense
per-token weights over named experts (X-LoRA), or sparse top-k experts per token. Mixtures differ
only in the routing they compute; layers read it, and nothing else is smuggled into ``forward``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from lorakit.errors import AdapterError, ConfigError


@dataclass(frozen=True)
class StaticRouting:
    """The active adapters and their weights: ``h = W0 x + sum_i w_i s_i B_i A_i x``."""

    weights: Mapping[str, float]

    @classmethod
    def of(cls, names: Sequence[str], weights: Sequence[float] | None) -> StaticRouting:
        """Routing for ``names`` with ``weights`` (default 1 each); validates lengths and finiteness."""
        if weights is None:
            weights = [1.0] * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"weights has {len(weights)} entries for {len(names)} adapters {list(names)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"adapter names repeat in {list(names)}")
        for name, weight in zip(names, weights, strict=True):
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"weight {weight!r} for adapter {name!r} is not a finite number")
        return cls({name: float(w) for name, w in zip(names, weights, strict=True)})


@dataclass(frozen=True)
class Combination:
    """A weighted, unmerged sum of adapters for one row: ``delta = sum_i w_i s_i B_i A_i x`` (weights may be
    negative). In a mixed batch it is one more choice: its factors are the members' stacked along the rank,
    ``A = [A_1; A_2; ...]`` and ``s B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, whose product is exactly the sum."""

    weights: tuple[tuple[str, float], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)


RowChoice = str | Combination | None
"""What one row of a mixed batch runs: an adapter, a combination, or (``None``) the base model alone."""


@dataclass(frozen=True)
class PerRowRouting:
    """One choice per row of the batch: an adapter name, a :class:`Combination`, or ``None`` (the base).

    With ``lengths`` the rows are *packed* into one sequence (``x`` is ``(1, T, ...)``): row ``b`` is the
    next ``lengths[b]`` positions. That is how a server reads many rows' single next tokens and other rows'
    prompt chunks in one forward without padding any of them (:func:`~lorakit.core.per_row.add_per_row_delta`)."""

    names: tuple[RowChoice, ...]
    lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.lengths is not None and (len(self.lengths) != len(self.names) or min(self.lengths, default=1) < 1):
            raise ConfigError(f"packed rows need one positive length per row; got {len(self.names)} rows and "
                              f"lengths {self.lengths}")

    @cached_property
    def single_token_rows(self) -> PerRowRouting:
        """Packed rows: the leading rows of one position each, as a batch of rows of their own."""
        lengths = self.lengths or ()
        count = next((row for row, length in enumerate(lengths) if length != 1), len(lengths))
        return PerRowRouting(self.names[:count])

    @cached_property
    def longer_rows(self) -> PerRowRouting:
        """Packed rows after :attr:`single_token_rows`, packed on their own."""
        count = len(self.single_token_rows.names)
        return PerRowRouting(self.names[count:], (self.lengths or ())[count:])

    @property
    def segments(self) -> tuple[tuple[RowChoice, int, int], ...]:
        """Packed rows: each row's ``(choice, first position, length)``."""
        starts = itertools.accumulate(self.lengths or (), initial=0)
        return tuple(zip(self.names, starts, self.lengths or (), strict=False))

    @cached_property
    def rows_by_adapter(self) -> dict[str | Combination, list[int]]:
        """The row indices of each choice (rows routed to ``None`` are left out)."""
        rows: dict[str | Combination, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                rows.setdefault(name, []).append(row)
        return rows

    @cached_property
    def combines(self) -> bool:
        """Whether a row asks for a :class:`Combination`."""
        return any(isinstance(choice, Combination) for choice in self.names)

    @cached_property
    def adapter_names(self) -> set[str]:
        """Every adapter the rows use, combinations' members included."""
        return {member for choice in self.rows_by_adapter
                for member in (choice.names if isinstance(choice, Combination) else (choice,))}

    def slots(self, held: Sequence[str | Combination], device: torch.device) -> torch.Tensor:
        """Each row's index into ``held`` (the choices a layer holds, in order), ``len(held)`` for a row whose
        choice the layer does not hold or that is routed to ``None``; cached per ``(held, device)``."""
        key = (tuple(held), device)
        cache = self.__dict__.setdefault("_slots", {})
        if key not in cache:
            index = {name: i for i, name in enumerate(held)}
            cache[key] = torch.tensor([index.get(name, len(held)) for name in self.names], device=device)
        return cache[key]


    def column_weights(self, adapters: Sequence[str], rank: int, device: torch.device, dtype: torch.dtype
                       ) -> torch.Tensor:
        """``(positions, len(adapters) * rank)``: each row's weight of each of ``adapters`` repeated over that
        adapter's ``rank`` columns (1 for the row's adapter, a combination's weights for its members, 0
        otherwise), one line per row (per position of packed rows); cached per ``(adapters, rank, device, dtype)``."""
        key = ("columns", tuple(adapters), rank, device, dtype)
        cache = self.__dict__.setdefault("_slots", {})
        if key not in cache:
            index = {name: i for i, name in enumerate(adapters)}
            weights = torch.zeros(len(self.names), len(adapters))
            for row, choice in enumerate(self.names):
                members = choice.weights if isinstance(choice, Combination) else ((choice, 1.0),) if choice else ()
                for name, weight in members:
                    if name in index:
                        weights[row, index[name]] += weight
            if self.lengths is not None:  # packed rows: each row's weights on each of its positions
                weights = weights.repeat_interleave(torch.tensor(self.lengths), dim=0)
            cache[key] = weights.repeat_interleave(rank, dim=1).to(device=device, dtype=dtype)
        return cache[key]


DenseWeights = Callable[[Any, torch.Tensor], "torch.Tensor | None"]
"""``weights(layer, x)``: expert weights ``(..., N)`` for the tokens of ``x`` at ``layer``, or ``None``."""

SparseSelection = Callable[[Any, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``select(layer, x)``: ``(indices, weights)``, both ``(..., k)``: each token's k experts and weights."""


@dataclass(frozen=True)
class DenseRouting:
    """Per-token weights over named experts: ``h = W0 x + g sum_n w_n(x) s_n B_n A_n x``.

    ``weights`` is asked at every wrapped layer (it may return that layer's own slice, as X-LoRA's
    layerwise scalings do); column ``n`` belongs to ``names[n]``; ``scale`` is ``g``. Experts that a
    layer does not hold are skipped there.
    """

    names: tuple[str, ...]
    weights: DenseWeights
    scale: float = 1.0


@dataclass(frozen=True)
class SparseRouting:
    """Each token's top-k experts: ``h = W0 x + g sum_j v_j s_{i_j} B_{i_j} A_{i_j} x``, computing only
    the selected experts (the same output as :class:`DenseRouting` with the other weights zero)."""

    names: tuple[str, ...]
    select: SparseSelection
    scale: float = 1.0


CallRouting = PerRowRouting | DenseRouting | SparseRouting

NO_ADAPTERS = StaticRouting({})


class RoutingState:
    """The routing every wrapped layer of one model reads at each forward."""

    def __init__(self) -> None:
        self.standing: StaticRouting = NO_ADAPTERS
        self.call: CallRouting | None = None
        self.disabled = False

    def current(self) -> StaticRouting | CallRouting:
        """The routing for the forward now running."""
        if self.disabled:
            return NO_ADAPTERS
        return self.call if self.call is not None else self.standing

    def snapshot(self) -> tuple[StaticRouting, CallRouting | None, bool]:
        """Everything :meth:`current` reads, to run a forward again as it ran now (:meth:`restored`)."""
        return self.standing, self.call, self.disabled

    @contextmanager
    def restored(self, snapshot: tuple[StaticRouting, CallRouting | None, bool]) -> Iterator[None]:
        """Inside the block, route as when ``snapshot`` was taken (a recomputed forward: activation
        checkpointing runs a block again in the backward, after the forward's routing has ended)."""
        previous = self.snapshot()
        self.standing, self.call, self.disabled = snapshot
        try:
            yield
        finally:
            self.standing, self.call, self.disabled = previous

    @contextmanager
    def override(self, routing: CallRouting, known: Sequence[str]) -> Iterator[None]:
        """Use ``routing`` instead of the standing choice inside the block; its names must be ``known``."""
        names = routing.adapter_names if isinstance(routing, PerRowRouting) else set(routing.names)
        unknown = sorted(n for n in names if n not in known)
        if unknown:
            raise AdapterError(f"routing names unknown adapters {unknown}; known: {sorted(known)}")
        previous, self.call = self.call, routing
        try:
            yield
        finally:
            self.call = previous
