"""How a forward pass says which adapters run, and with which weights.

One :class:`RoutingState` is shared by every wrapped layer of a model. It holds the model's standing
choice (the active adapters with static weights, possibly negative) and, for the duration of one
call, an override: one adapter per batch row (mixed batches). Layers read it; nothing else is
smuggled into ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

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
        for name, weight in zip(names, weights):
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"weight {weight!r} for adapter {name!r} is not a finite number")
        return cls({name: float(w) for name, w in zip(names, weights)})


@dataclass(frozen=True)
class PerRowRouting:
    """One adapter name (or ``None``: the base model alone) for each row of the batch."""

    names: tuple[str | None, ...]

    @cached_property
    def rows_by_adapter(self) -> dict[str, list[int]]:
        """The row indices of each adapter named (rows routed to ``None`` are left out)."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                rows.setdefault(name, []).append(row)
        return rows


NO_ADAPTERS = StaticRouting({})


class RoutingState:
    """The routing every wrapped layer of one model reads at each forward."""

    def __init__(self) -> None:
        self.standing: StaticRouting = NO_ADAPTERS
        self.call: PerRowRouting | None = None
        self.disabled = False

    def current(self) -> StaticRouting | PerRowRouting:
        """The routing for the forward now running."""
        if self.disabled:
            return NO_ADAPTERS
        return self.call if self.call is not None else self.standing

    @contextmanager
    def per_row(self, names: Sequence[str | None], known: Sequence[str]) -> Iterator[None]:
        """Route row ``i`` of every batch to adapter ``names[i]`` inside the block."""
        unknown = sorted({n for n in names if n is not None and n not in known})
        if unknown:
            raise AdapterError(f"adapter_per_row names unknown adapters {unknown}; known: {sorted(known)}")
        previous, self.call = self.call, PerRowRouting(tuple(names))
        try:
            yield
        finally:
            self.call = previous
