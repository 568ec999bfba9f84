"""Mixed batches: one adapter per batch row (:class:`PerRowRouting`), no Python loop over adapters.

For a linear-type layer with the batch's distinct adapters ``1..N`` the factors are stacked once,
``A`` as ``(N + 1, R, d_in)`` and ``s B`` as ``(N + 1, d_out, R)`` with ``R`` the largest rank (smaller
ranks zero-padded, which adds nothing) and slot ``N + 1`` all zeros for rows routed to ``None``. Each
row then gathers its own slot and two batched products give every row's delta at once::

    delta_b = (x_b A_{j(b)}^T) (s_{j(b)} B_{j(b)})^T        # (T, d_out) for row b with adapter j(b)

Without autograd the stack is cached on the layer until an adapter's factors change
(:mod:`lorakit.core.stack_cache`); with autograd the stack is rebuilt each call and gradients flow
back to each adapter's own ``A`` and ``B`` (several adapters trained in one batch). Other kinds
(embeddings, convolutions) and dropout in training (one mask per adapter) take one gather and
scatter per adapter instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lorakit.core.adapter import LoraAdapter
from lorakit.core.kinds import LinearKind
from lorakit.core.routing import PerRowRouting
from lorakit.core.stack_cache import cached_stack
from lorakit.errors import ConfigError, StateError

if TYPE_CHECKING:
    from lorakit.core.layer import LoraLayer


def add_per_row_delta(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor,
                      routing: PerRowRouting) -> torch.Tensor:
    """``result`` (the base layer's output for ``x``) plus each row's own adapter delta."""
    if layer.merged:
        raise StateError(f"adapters {sorted(layer.merged)} are merged into the base weights; unmerge "
                         "them before running a mixed batch (adapter_per_row)")
    if len(routing.names) != x.shape[0]:
        raise ConfigError(f"adapter_per_row has {len(routing.names)} names for a batch of {x.shape[0]} rows")
    held = [name for name in routing.rows_by_adapter if name in layer.adapters]
    if not held:
        return result
    if len(held) == 1 and len(routing.rows_by_adapter[held[0]]) == x.shape[0]:  # one adapter for all rows
        return result + layer.adapter_delta(held[0], x).to(result.dtype)
    adapters = [layer.adapters[name] for name in held]
    dropping = layer.training and any(a.dropout > 0 for a in adapters)
    if dropping or not isinstance(layer.kind, LinearKind):
        return _by_adapter(layer, x, result, routing, held)
    stacked_A, stacked_B = stacked_factors(adapters, layer.stacks)
    delta = per_row_delta(x, routing.slots(held, x.device), stacked_A, stacked_B)
    return result + delta.to(result.dtype)


def _by_adapter(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting,
                held: list[str]) -> torch.Tensor:
    """The mixed batch one gather/scatter per adapter (embeddings, convolutions, per-adapter dropout)."""
    for name in held:
        index = torch.tensor(routing.rows_by_adapter[name], device=x.device)
        delta = layer.adapter_delta(name, x.index_select(0, index))
        result = result.index_add(0, index, delta.to(result.dtype))
    return result


def stacked_factors(adapters: list[LoraAdapter], cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_stack, sB_stack)`` of ``adapters`` plus a zero slot; cached in ``cache`` without autograd."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        factors = [a.factors() for a in adapters]
        rank = max(A.shape[0] for A, _, _ in factors)
        stacked_A = torch.stack([F.pad(A, (0, 0, 0, rank - A.shape[0])) for A, _, _ in factors])  # (N, R, d_in)
        stacked_B = torch.stack([F.pad(B * scale, (0, rank - B.shape[1])) for _, B, scale in factors])  # (N, d_out, R)
        return F.pad(stacked_A, (0, 0, 0, 0, 0, 1)), F.pad(stacked_B, (0, 0, 0, 0, 0, 1))  # zero slot last

    return cached_stack(cache, "per_row", adapters, build)


def per_row_delta(x: torch.Tensor, slots: torch.Tensor, stacked_A: torch.Tensor,
                  stacked_B: torch.Tensor) -> torch.Tensor:
    """Row ``b``'s delta ``(x_b A_j^T)(s_j B_j)^T`` for ``j = slots[b]``; ``x`` is (batch, ..., d_in)."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1, x.shape[-1]).to(stacked_A.dtype)  # (batch, T, d_in)
    code = torch.bmm(flat, stacked_A.index_select(0, slots).transpose(1, 2))  # (batch, T, R)
    delta = torch.bmm(code, stacked_B.index_select(0, slots).transpose(1, 2))  # (batch, T, d_out)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])
