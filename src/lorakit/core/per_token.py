"""Per-token expert routing (X-LoRA, MeteoRA): every token gets its own weights over named experts.

Both routing forms compute one sum, per token, over the experts a layer holds::

    delta = g sum_n w_n s_n B_n A_n x

* :class:`DenseRouting` weighs every expert (``w`` is ``(..., N)``). The experts' factors are stacked
  along the rank, ``A = [s_1 A_1; ...; s_N A_N]`` (R x d_in) and ``B = [B_1 ... B_N]`` (d_out x R), so
  ``delta = g B ((A x) * w_{n(j)})`` where rank column ``j`` belongs to expert ``n(j)``: two matrix
  products per layer however many experts. Without autograd the stack is cached on the layer until an
  expert's factors change (:mod:`lorakit.core.stack_cache`).
* :class:`SparseRouting` computes each token's top-k experts only, as a grouped product: the
  (token, expert) pairs are sorted by expert, each expert runs once on its contiguous slice of
  gathered inputs (reading its factors afresh, so nothing is cached), and the weighted results are
  added back to their tokens. It equals the dense sum with the other weights zero.

The two share this module because they are one computation (sparse is dense restricted to the
selected pairs); one adapter per batch row is :mod:`lorakit.core.per_row`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorakit.core.kinds import Conv2dKind
from lorakit.core.routing import DenseRouting, SparseRouting
from lorakit.core.stack_cache import cached_stack
from lorakit.errors import StateError

if TYPE_CHECKING:
    from lorakit.core.layer import LoraLayer


def add_expert_delta(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor,
                     routing: DenseRouting | SparseRouting) -> torch.Tensor:
    """``result`` (the base layer's output for ``x``) plus the routed experts' delta for every token;
    ``result`` itself where the router leaves this layer out or the layer holds none of the experts."""
    if isinstance(layer.kind, Conv2dKind):
        raise StateError("per-token expert routing applies to Linear, Conv1D and Embedding layers, not Conv2d")
    if isinstance(routing, DenseRouting):
        weights = routing.weights(layer, x)
        delta = None if weights is None else _dense(layer, x, routing, weights)
    else:
        selection = routing.select(layer, x)
        delta = None if selection is None else _sparse(layer, x, routing, *selection)
    return result if delta is None else result + delta.to(result.dtype)


def _dense(layer: LoraLayer, x: torch.Tensor, routing: DenseRouting, weights: torch.Tensor) -> torch.Tensor | None:
    """``g sum_n w_n s_n B_n (A_n x)`` over the experts ``layer`` holds, stacked (module docstring)."""
    present = [(column, name) for column, name in enumerate(routing.names) if name in layer.adapters]
    if not present:
        return None
    if layer.training and any(layer.adapters[name].dropout > 0 for _, name in present):
        return _dense_with_dropout(layer, x, routing, weights, present)
    A, B, owner = _stacked(layer, present)
    inputs = x.to(A.dtype) if x.is_floating_point() else x
    code = layer.kind.down(layer.base_layer, inputs, A)  # (..., R), scales already folded into A
    delta = layer.kind.up(code * weights.index_select(-1, owner).to(code.dtype), B)  # (..., d_out)
    return delta if routing.scale == 1.0 else delta * routing.scale


def _dense_with_dropout(layer: LoraLayer, x: torch.Tensor, routing: DenseRouting, weights: torch.Tensor,
                        present: list[tuple[int, str]]) -> torch.Tensor:
    """The dense sum one expert at a time, each with its own dropout mask on the input."""
    delta = 0.0
    for column, name in present:
        part = layer.adapter_delta(name, x, routing.scale)
        delta = delta + part * weights[..., column:column + 1].to(part.dtype)
    return delta


def _stacked(layer: LoraLayer, present: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' scaled factors stacked along the rank, and each rank column's expert column."""
    adapters = [layer.adapters[name] for _, name in present]

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        factors = [a.factors() for a in adapters]
        owner = [column for (column, _), (A, _, _) in zip(present, factors, strict=True) for _ in range(A.shape[0])]
        return (torch.cat([A * scale for A, _, scale in factors], dim=0),  # (R, d_in)
                torch.cat([B for _, B, _ in factors], dim=1),  # (d_out, R)
                torch.tensor(owner, device=adapters[0].A.device))  # (R,)

    return cached_stack(layer.stacks, "dense", adapters, build, extra=tuple(column for column, _ in present))


def _sparse(layer: LoraLayer, x: torch.Tensor, routing: SparseRouting, indices: torch.Tensor,
            values: torch.Tensor) -> torch.Tensor | None:
    """The dense sum restricted to each token's selected experts (``indices``, ``values``: (..., k))."""
    k = indices.shape[-1]
    flat_x = x.reshape(-1, x.shape[-1]) if x.is_floating_point() else x.reshape(-1)  # (T, d_in) or (T,) ids
    local = [name if name in layer.adapters else None for name in routing.names]
    held = torch.tensor([name is not None for name in local], device=indices.device)
    pair_expert = indices.reshape(-1)  # (T * k,)
    pair_token = torch.arange(flat_x.shape[0], device=indices.device).repeat_interleave(k)
    pair_value = values.reshape(-1)
    keep = held[pair_expert].nonzero().squeeze(-1)
    if keep.numel() == 0:
        return None
    order = pair_expert.index_select(0, keep).argsort(stable=True)
    chosen = keep.index_select(0, order)  # the kept pairs, grouped by expert
    tokens = pair_token.index_select(0, chosen)
    counts = torch.bincount(pair_expert.index_select(0, chosen), minlength=len(local)).tolist()
    inputs = flat_x.index_select(0, tokens)
    parts, start = [], 0
    for name, count in zip(local, counts, strict=True):
        if count:
            parts.append(layer.adapter_delta(name, inputs[start:start + count], routing.scale))
            start += count
    weighted = torch.cat(parts) * pair_value.index_select(0, chosen).unsqueeze(-1).to(parts[0].dtype)
    delta = weighted.new_zeros((flat_x.shape[0], weighted.shape[-1])).index_add_(0, tokens, weighted)
    return delta.reshape(*indices.shape[:-1], delta.shape[-1])
