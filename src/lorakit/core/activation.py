"""Choosing which adapters run: the active set with weights, and temporary changes of it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.core.routing import CallRouting, PerRowRouting, StaticRouting
from lorakit.core.state import model_state


def set_active(model: nn.Module, *names: str, weights: Sequence[float] | None = None) -> None:
    """Make exactly ``names`` active, with ``weights`` (default 1 each; negative weights subtract).

    The forward then computes ``h = W0 x + sum_i w_i s_i B_i A_i x``. No names: the base model alone.
    """
    state = model_state(model)
    for name in names:
        state.require(name)
    state.routing.standing = StaticRouting.of(list(names), weights)


def active_weights(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights."""
    return dict(model_state(model).routing.standing.weights)


@contextmanager
def active(model: nn.Module, *names: str, weights: Sequence[float] | None = None) -> Iterator[nn.Module]:
    """Inside the block, exactly ``names`` are active (see :func:`set_active`); restored afterwards."""
    routing = model_state(model).routing
    previous = routing.standing
    set_active(model, *names, weights=weights)
    try:
        yield model
    finally:
        routing.standing = previous


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base model's output (merged adapters are taken out too)."""
    routing = model_state(model).routing
    previous = routing.disabled
    routing.disabled = True
    try:
        yield model
    finally:
        routing.disabled = previous


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch uses adapter ``names[i]`` (``None``: the base model).

    The same as passing ``adapter_per_row=names`` to each forward call; use it around ``generate``.
    """
    with routed(model, PerRowRouting(tuple(names))):
        yield model


@contextmanager
def routed(model: nn.Module, routing: CallRouting) -> Iterator[nn.Module]:
    """Inside the block every forward uses ``routing`` (per-row, dense or sparse) instead of the active set."""
    state = model_state(model)
    with state.routing.override(routing, list(state.adapters)):
        yield model
