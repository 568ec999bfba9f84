"""Mixed batches: one adapter (or weighted combination) per batch row (:class:`PerRowRouting`), no Python
loop over adapters.

For a linear-type layer with the batch's distinct adapters ``1..N`` the factors are stacked once,
``A`` as ``(N + 1, R, d_in)`` and ``s B`` as ``(N + 1, d_out, R)`` with ``R`` the largest rank (smaller
ranks zero-padded, which adds nothing) and slot ``N + 1`` all zeros for rows routed to ``None``. Each
row then gathers its own slot and two batched products give every row's delta at once::

    delta_b = (x_b A_{j(b)}^T) (s_{j(b)} B_{j(b)})^T        # (T, d_out) for row b with adapter j(b)

Without autograd the stack is cached on the layer until an adapter's factors change
(:mod:`lorakit.core.stack_cache`); with autograd the stack is rebuilt each call and gradients flow
back to each adapter's own ``A`` and ``B`` (several adapters trained in one batch). Other kinds
(embeddings, convolutions) and dropout in training (one mask per adapter) take one gather and
scatter per adapter instead. A :class:`~lorakit.core.routing.Combination` ``sum_i w_i s_i B_i A_i`` is one
more slot whose factors are its members' concatenated along the rank (``R`` is then the largest sum).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lorakit.core.adapter import LoraAdapter
from lorakit.core.kinds import LinearKind
from lorakit.core.routing import Combination, PerRowRouting
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
    if len(routing.names) != x.shape[0]:
        raise ConfigError(f"adapter_per_row has {len(routing.names)} names for a batch of {x.shape[0]} rows")
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
                    key: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_stack, sB_stack)`` of the choices ``held`` plus a zero slot, cached on the layer without autograd.

    A combination's slot holds its members' factors side by side along the rank (the weights folded into
    ``B``); ``adapters`` are every member, for the cache key (``key``: already computed from them)."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        slots = [_slot_factors(layer, choice) for choice in held]
        rank = max(A.shape[0] for A, _ in slots)
        stacked_A = torch.stack([F.pad(A, (0, 0, 0, rank - A.shape[0])) for A, _ in slots])  # (N, R, d_in)
        stacked_B = torch.stack([F.pad(B, (0, rank - B.shape[1])) for _, B in slots])  # (N, d_out, R)
        return F.pad(stacked_A, (0, 0, 0, 0, 0, 1)), F.pad(stacked_B, (0, 0, 0, 0, 0, 1))  # zero slot last

    return cached_stack(layer.stacks, "per_row", adapters, build, extra=tuple(held), key=key)


def _slot_factors(layer: LoraLayer, choice: str | Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, w s B)`` of one choice: ``(r, d_in)`` and ``(d_out, r)``, members concatenated along the rank."""
    factors = [(layer.adapters[name].factors(), weight) for name, weight in _members(layer, choice)]
    A = torch.cat([A for (A, _, _), _ in factors])
    B = torch.cat([B * (scale * weight) for (_, B, scale), weight in factors], dim=1)
    return A, B


def row_factors(layer: LoraLayer, held: list[str | Combination], adapters: list[LoraAdapter],
                routing: PerRowRouting, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's own factors laid out for ``bmm``: ``A_rows`` (batch, d_in, R) and ``B_rows`` (batch, R, d_out),
    gathered from the stack by the rows' slots. Without autograd they are cached with the routing in the key,
    so the decode steps of an unchanged batch gather nothing (the factors' key is read once per call)."""
    key = None if torch.is_grad_enabled() else factors_key(adapters)
    stacked_A, stacked_B = stacked_factors(layer, held, adapters, key)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        slots = routing.slots(held, device)
        return (stacked_A.index_select(0, slots).transpose(1, 2).contiguous(),
                stacked_B.index_select(0, slots).transpose(1, 2).contiguous())

    return cached_stack(layer.stacks, "per_row_rows", adapters, build, extra=(tuple(held), routing.names), key=key)


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
