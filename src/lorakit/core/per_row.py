"""Mixed batches: one adapter (or weighted combination) per batch row (:class:`PerRowRouting`), no Python
loop over adapters.

For a linear-type layer with the batch's distinct adapters ``1..N`` the factors are stacked once,
``A^T`` as ``(N + 1, d_in, R)`` and ``(s B)^T`` as ``(N + 1, R, d_out)`` with ``R`` the largest rank (smaller
ranks zero-padded, which adds nothing) and slot ``N + 1`` all zeros for rows routed to ``None``. Each
row then gathers its own slot and two batched products give every row's delta at once::

    delta_b = (x_b A_{j(b)}^T) (s_{j(b)} B_{j(b)})^T        # (T, d_out) for row b with adapter j(b)

Without autograd the stack is cached on the layer until an adapter's factors change
(:mod:`lorakit.core.stack_cache`); with autograd the stack is rebuilt each call and gradients flow
back to each adapter's own ``A`` and ``B`` (several adapters trained in one batch). Other kinds
(embeddings, convolutions) and dropout in training (one mask per adapter) take one gather and
scatter per adapter instead. A :class:`~lorakit.core.routing.Combination` ``sum_i w_i s_i B_i A_i`` is one
more slot whose factors are its members' concatenated along the rank (``R`` is then the largest sum).

Rows of one position each (decode steps) without autograd gather from a stack of *every* adapter of the
layer while it holds few enough per row (:func:`_gathers_from_every_adapter`): the stack changes only when the
layer's adapters do, so rows joining and leaving the batch (every step, under continuous batching) cost
one gather instead of a new stack of the batch's choices.

*Packed* rows (``PerRowRouting.lengths``: one sequence ``(1, T, d_in)`` holding every row's positions one
after the other, as a server packs decode tokens and prompt chunks) take the paths above for the leading
rows of one position each, and the longer rows (prompt chunks) go through the adapters they use at once,
each position weighted by its row's choice (:func:`add_dense_row_deltas`: ``((x A^T) * W) sB``, ``W``
each position's weight of each adapter: 0, 1, or a combination's weights): one product pair for all of
them, while that wastes less arithmetic than a product pair per row would cost to dispatch; otherwise
one pair per row (:func:`add_segment_deltas`; :func:`add_packed_row_deltas` chooses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lorakit.core.adapter import LoraAdapter
from lorakit.core.kinds import LinearKind
from lorakit.core.routing import Combination, PerRowRouting, RowChoice
from lorakit.core.stack_cache import cached_stack, factors_key
from lorakit.errors import ConfigError, StateError

if TYPE_CHECKING:
    from lorakit.core.layer import LoraLayer


def add_per_row_delta(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor,
                      routing: PerRowRouting) -> torch.Tensor:
    """``result`` (the base layer's output for ``x``) plus each row's own adapter (or combination) delta."""
    if layer.merged:
        raise StateError(f"adapters {sorted(layer.merged)} are merged into the base weights; unmerge "
                         "them before running a mixed batch (adapter_per_row)")
    if routing.lengths is not None:
        return _add_packed_deltas(layer, x, result, routing)
    if len(routing.names) != x.shape[0]:
        raise ConfigError(f"adapter_per_row has {len(routing.names)} names for a batch of {x.shape[0]} rows")
    if _gathers_from_every_adapter(layer, x, routing):
        A_rows, B_rows = row_factors(layer, list(layer.adapters), list(layer.adapters.values()), routing, x.device,
                                     slot=EVERY_ADAPTER_SLOT)
        return add_row_deltas(x, result, A_rows, B_rows)
    held, adapters = _plan(layer, routing)
    if not held:
        return result
    if len(held) == 1 and len(routing.rows_by_adapter[held[0]]) == x.shape[0]:  # one choice for all rows
        return result + _choice_delta(layer, held[0], x).to(result.dtype)
    dropping = layer.training and any(a.dropout > 0 for a in adapters)
    if dropping or not isinstance(layer.kind, LinearKind):
        return _by_choice(layer, x, result, routing, held)
    A_rows, B_rows = row_factors(layer, held, adapters, routing, x.device)
    return add_row_deltas(x, result, A_rows, B_rows)


def _add_packed_deltas(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor,
                       routing: PerRowRouting) -> torch.Tensor:
    """Packed rows (``x`` ``(1, T, ...)``): the leading one-position rows as a mixed batch of their own (the
    paths above), then the longer rows (prompt chunks) through the adapters they use, each position weighted
    by its row's choice (:func:`add_packed_row_deltas`; one product pair per row with autograd or dropout)."""
    if x.shape[0] != 1 or sum(routing.lengths) != x.shape[1]:
        raise ConfigError(f"packed rows of {sum(routing.lengths)} positions in all need an input of shape "
                          f"(1, {sum(routing.lengths)}, ...); got {tuple(x.shape)}")
    single, longer = routing.single_token_rows, routing.longer_rows
    count = len(single.names)
    pieces = []
    if count:
        head = add_per_row_delta(layer, x[0, :count].unsqueeze(1), result[0, :count].unsqueeze(1), single)
        pieces.append(head.reshape(1, count, *result.shape[2:]))
    if longer.names:
        used = tuple(name for name in layer.adapters if name in longer.adapter_names)
        part, inputs = result[:, count:], x[:, count:]
        if used and _dense_allowed(layer):
            part = add_packed_row_deltas(layer, inputs, part, longer, used)
        elif used:
            part = torch.cat([_segment(layer, inputs, part, choice, start, length)
                              for choice, start, length in longer.segments], dim=1)
        pieces.append(part)
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def _segment(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, choice: RowChoice, start: int,
             length: int) -> torch.Tensor:
    """Positions ``start .. start + length`` of ``result`` plus ``choice``'s delta there."""
    part = result[:, start:start + length]
    if choice is None or not _members(layer, choice):
        return part
    return part + _choice_delta(layer, choice, x[:, start:start + length]).to(result.dtype)


def _plan(layer: LoraLayer, routing: PerRowRouting) -> tuple[list[str | Combination], list[LoraAdapter]]:
    """The choices of ``routing`` this layer holds and their adapters, kept while the rows' choices and the
    layer's set of adapters (its ``epoch``) are unchanged: a decode step does not recompute them per layer."""
    key = (routing.names, layer.epoch)
    cached = layer.stacks.get("per_row_plan")
    if cached is None or cached[0] != key:
        held = [choice for choice in routing.rows_by_adapter if _members(layer, choice)]
        adapters = [layer.adapters[name] for choice in held for name, _ in _members(layer, choice)]
        cached = layer.stacks["per_row_plan"] = (key, (held, adapters))
    return cached[1]


def _members(layer: LoraLayer, choice: str | Combination) -> list[tuple[str, float]]:
    """The adapters of ``choice`` this layer holds, with their weights (an adapter alone has weight 1)."""
    weights = choice.weights if isinstance(choice, Combination) else ((choice, 1.0),)
    return [(name, weight) for name, weight in weights if name in layer.adapters]


def _choice_delta(layer: LoraLayer, choice: str | Combination, x: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i s_i B_i A_i x`` over the members of ``choice`` the layer holds."""
    members = _members(layer, choice)
    delta = layer.adapter_delta(members[0][0], x, members[0][1])
    for name, weight in members[1:]:
        delta = delta + layer.adapter_delta(name, x, weight)
    return delta


def _by_choice(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting,
               held: list[str | Combination]) -> torch.Tensor:
    """The mixed batch one gather/scatter per choice (embeddings, convolutions, per-adapter dropout)."""
    for choice in held:
        index = torch.tensor(routing.rows_by_adapter[choice], device=x.device)
        delta = _choice_delta(layer, choice, x.index_select(0, index))
        result = result.index_add(0, index, delta.to(result.dtype))
    return result


def stacked_factors(layer: LoraLayer, held: list[str | Combination], adapters: list[LoraAdapter],
                    key: tuple | None = None, slot: str = "per_row") -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_stack, sB_stack)`` of the choices ``held`` plus a zero slot, laid out for ``bmm`` (``(N + 1, d_in, R)``
    and ``(N + 1, R, d_out)``, so that gathering rows is the only copy), cached on the layer without autograd.

    A combination's slot holds its members' factors side by side along the rank (the weights folded into
    ``B``); ``adapters`` are every member, for the cache key (``key``: already computed from them). The stack
    of every adapter lives in a ``slot`` of its own, so that a stack of a batch's choices does not evict it."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        slots = [_slot_factors(layer, choice) for choice in held]
        rank = max(A.shape[0] for A, _ in slots)
        stacked_A = torch.stack([F.pad(A, (0, 0, 0, rank - A.shape[0])).T for A, _ in slots])  # (N, d_in, R)
        stacked_B = torch.stack([F.pad(B, (0, rank - B.shape[1])).T for _, B in slots])  # (N, R, d_out)
        return F.pad(stacked_A, (0, 0, 0, 0, 0, 1)), F.pad(stacked_B, (0, 0, 0, 0, 0, 1))  # zero slot last

    return cached_stack(layer.stacks, slot, adapters, build, extra=tuple(held), key=key)


def _slot_factors(layer: LoraLayer, choice: str | Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, w s B)`` of one choice: ``(r, d_in)`` and ``(d_out, r)``, members concatenated along the rank."""
    factors = [(layer.adapters[name].factors(), weight) for name, weight in _members(layer, choice)]
    A = torch.cat([A for (A, _, _), _ in factors])
    B = torch.cat([B * (scale * weight) for (_, B, scale), weight in factors], dim=1)
    return A, B


def row_factors(layer: LoraLayer, held: list[str | Combination], adapters: list[LoraAdapter],
                routing: PerRowRouting, device: torch.device,
                slot: str = "per_row") -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's own factors laid out for ``bmm``: ``A_rows`` (batch, d_in, R) and ``B_rows`` (batch, R, d_out),
    gathered from the stack by the rows' slots. Without autograd they are cached with the routing in the key,
    so the decode steps of an unchanged batch gather nothing (the factors' key is read once per call)."""
    key = None if torch.is_grad_enabled() else factors_key(adapters)
    stacked_A, stacked_B = stacked_factors(layer, held, adapters, key, slot)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        slots = routing.slots(held, device)
        return stacked_A.index_select(0, slots), stacked_B.index_select(0, slots)

    return cached_stack(layer.stacks, "per_row_rows", adapters, build, extra=(tuple(held), routing.names), key=key)


def _dense_allowed(layer: LoraLayer) -> bool:
    """Whether :func:`add_dense_row_deltas` may run: a linear layer, no autograd, no dropout acting."""
    return not torch.is_grad_enabled() and isinstance(layer.kind, LinearKind) and not (
        layer.training and any(a.dropout > 0 for a in layer.adapters.values()))


EVERY_ADAPTER_SLOT = "per_row_every"
"""Where the stack of every adapter of a layer is kept (:func:`stacked_factors`)."""

EVERY_ADAPTER_PER_ROW = 2
"""Rows of one position each gather their factors from a stack of every adapter of the layer while it holds at
most this many per row (the stack then costs at most that many rows' factors in memory)."""


def _gathers_from_every_adapter(layer: LoraLayer, x: torch.Tensor, routing: PerRowRouting) -> bool:
    """Whether ``x``'s rows (one position each: decode steps; no autograd, no dropout, no combination, more than
    one choice) gather their factors (:func:`row_factors`) from the stack of every adapter of the layer rather
    than of the batch's choices: that stack is rebuilt only when the layer's adapters change, so rows joining
    and leaving the batch (every step, under continuous batching) cost one gather, not a new stack too."""
    rows = x.shape[0]
    return (x.numel() == rows * x.shape[-1] and 1 < len(routing.rows_by_adapter) and not routing.combines
            and len(layer.adapters) <= EVERY_ADAPTER_PER_ROW * rows and _dense_allowed(layer))


def _side_by_side(adapters: list[LoraAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` ``(N R, d_in)`` and ``sB`` ``(N R, d_out)`` of ``adapters`` (ranks zero-padded to the largest, ``R``)."""
    factors = [a.factors() for a in adapters]
    rank = max(A.shape[0] for A, _, _ in factors)
    A = torch.cat([F.pad(A, (0, 0, 0, rank - A.shape[0])) for A, _, _ in factors])
    sB = torch.cat([F.pad(B * scale, (0, rank - B.shape[1])).T for _, B, scale in factors])
    return A, sB


def dense_factors(layer: LoraLayer, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_side_by_side` of adapters ``names`` of ``layer``, cached while the names and their factors are
    unchanged."""
    adapters = [layer.adapters[name] for name in names]
    return cached_stack(layer.stacks, "per_row_dense", adapters, lambda: _side_by_side(adapters), extra=names)


DISPATCH_MACS = 1_000_000
"""About what dispatching one product pair costs, in multiply-adds (measured on this project's CPU: a few
microseconds), to choose between products over every used adapter and one product pair per row."""


def add_packed_row_deltas(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting,
                          names: tuple[str, ...]) -> torch.Tensor:
    """``result`` plus each packed row's delta without autograd, by whichever costs less: products over every used
    adapter at once (:func:`add_dense_row_deltas`: each position pays for ``len(names)`` adapters), or one
    product pair per row and member (:func:`add_segment_deltas`: each pair pays a dispatch). At 32 prompt
    chunks over 32 adapters the first does 32 times the arithmetic needed (7x slower at 1,600 positions)."""
    pairs = sum(len(_members(layer, choice)) for choice, _, _ in routing.segments if choice is not None)
    adapters = [layer.adapters[name] for name in names]
    ranks = sum(adapter.rank for adapter in adapters)
    width = adapters[0].A.shape[1] + adapters[0].B.shape[0]  # d_in + d_out
    wasted = x.shape[:-1].numel() * ranks * width * (len(names) - 1) // len(names)
    if wasted <= pairs * DISPATCH_MACS:
        return add_dense_row_deltas(layer, x, result, routing, names)
    return add_segment_deltas(layer, x, result, routing)


def add_segment_deltas(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting) -> torch.Tensor:
    """``result`` plus each packed row's delta, one product pair per row and member of its choice, without
    autograd, straight from each adapter's factors (nothing stacked)::

        result[positions of b] += w_i s_i (x[positions of b] A_i^T) B_i^T      # each member i of b's choice

    ``x`` is packed (1, T, d_in); accumulates in place when ``result`` allows it."""
    dtype = next(iter(layer.adapters.values())).A.dtype
    flat_x = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, d_in)
    in_place = result.is_contiguous() and result.dtype == dtype
    flat = (result if in_place else result.new_zeros(result.shape, dtype=dtype)).view(flat_x.shape[0], -1)  # (T, d_out)
    for choice, start, length in routing.segments:
        for name, weight in _members(layer, choice) if choice is not None else ():
            A, B, scale = layer.adapters[name].factors()
            code = flat_x[start:start + length] @ A.T  # (length, r)
            flat[start:start + length].addmm_(code, B.T, alpha=weight * scale)
    return result if in_place else result + flat.view(result.shape).to(result.dtype)


def add_dense_row_deltas(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting,
                         names: tuple[str, ...]) -> torch.Tensor:
    """``result`` plus every position's delta through the adapters ``names`` at once, nothing gathered::

        delta = ((x A^T) * W) sB        # (positions, N R) codes, weighted, then (positions, d_out)

    ``W`` (positions, N R) holds each position's row's weight of each adapter on that adapter's ``R`` columns
    (1 for the row's adapter, ``w_i`` for a combination's members, 0 elsewhere; packed rows repeat it over
    their positions), so a combination costs no more than an adapter and rows that change only change
    ``W``. ``x`` is (rows, ..., d_in) or packed (1, T, d_in)."""
    A, sB = dense_factors(layer, names)
    rank = A.shape[0] // len(names)
    code = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.T  # (positions, N R)
    code.mul_(routing.column_weights(names, rank, code.device, code.dtype))
    flat = result.view(code.shape[0], -1) if result.is_contiguous() and result.dtype == sB.dtype else None
    if flat is not None:
        flat.addmm_(code, sB)  # (positions, d_out) += code sB
        return result
    return result + (code @ sB).reshape(result.shape).to(result.dtype)


def add_row_deltas(x: torch.Tensor, result: torch.Tensor, A_rows: torch.Tensor, B_rows: torch.Tensor) -> torch.Tensor:
    """``result`` plus row ``b``'s ``(x_b A_b^T)(s_b B_b)^T``; ``x`` is (batch, ..., d_in). Without autograd the
    second product accumulates into ``result`` itself (``baddbmm_``: no delta tensor, no extra pass)."""
    rows = x.shape[0]
    code = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(A_rows.dtype), A_rows)  # (batch, T, R)
    if not torch.is_grad_enabled() and result.dtype == B_rows.dtype and result.is_contiguous():
        result.view(rows, -1, result.shape[-1]).baddbmm_(code, B_rows)  # (batch, T, d_out) += code B_rows
        return result
    delta = torch.bmm(code, B_rows)  # (batch, T, d_out)
    return result + delta.reshape(result.shape).to(result.dtype)
