"""The spine of lorakit: a base layer wrapped with any number of named LoRA adapters.

``LoraLayer(base_layer)`` keeps the original module as ``self.base_layer`` and its adapters in one
``nn.ModuleDict``. Each forward reads the model's shared :class:`RoutingState`:

* static routing (the active set with weights ``w_i``, negative allowed):
  ``h = W0 x + sum_i w_i s_i B_i A_i drop_i(x)``;
* per-row routing (mixed batches): row ``b`` gets ``s_j B_j A_j x_b`` for its own adapter ``j``,
  or nothing for ``None``.

Merging folds ``w s B A`` into ``W0`` and records the weight; the forward then subtracts whatever
the routing does not ask for, so merging never changes what the model computes, only where.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.adapter import LoraAdapter
from lorakit.core.kinds import LayerKind
from lorakit.core.routing import PerRowRouting, RoutingState, StaticRouting
from lorakit.errors import ConfigError, StateError


class LoraLayer(nn.Module):
    """A base layer plus named adapters; see the module docstring for the arithmetic."""

    def __init__(self, base_layer: nn.Module, kind: LayerKind, routing: RoutingState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.merged: dict[str, float] = {}
        """Adapters folded into ``base_layer.weight``, with the weight they were folded in at."""
        self.routing = routing

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        return f"kind={self.kind.name}{merged}"

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Create adapter ``name`` shaped by ``config`` (after its rank/alpha patterns for ``module_name``)."""
        self.adapters[name] = LoraAdapter(
            self.base_layer, self.kind, rank=config.rank_for(module_name), alpha=config.alpha_for(module_name),
            scale=config.scale_for(module_name), dropout=config.dropout, init=config.init)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self.routing.current()
        if isinstance(routing, PerRowRouting):
            return self._per_row(x, result, routing)
        for name, weight in self._static_weights(routing).items():
            result = result + self._delta(self.adapters[name], x, weight).to(result.dtype)
        return result

    def _static_weights(self, routing: StaticRouting) -> dict[str, float]:
        """Each adapter's weight in this forward, less what merging already put in the base weight."""
        weights = {n: w for n, w in routing.weights.items() if n in self.adapters}
        for name, merged_weight in self.merged.items():
            weights[name] = weights.get(name, 0.0) - merged_weight
        return {n: w for n, w in weights.items() if w != 0.0}

    def _delta(self, adapter: LoraAdapter, x: torch.Tensor, weight: float) -> torch.Tensor:
        """``weight * s * up(down(drop(x), A), B)``, computed in the adapter's dtype."""
        if x.is_floating_point():
            x = x.to(adapter.A.dtype)
        code = self.kind.down(self.base_layer, adapter.drop(x), adapter.A)
        return self.kind.up(code, adapter.B) * (weight * adapter.scale)

    def _per_row(self, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting) -> torch.Tensor:
        """Mixed batch: add each row's own adapter delta, one gather/scatter per distinct adapter."""
        if self.merged:
            raise StateError(f"adapters {sorted(self.merged)} are merged into the base weights; unmerge "
                             "them before running a mixed batch (adapter_per_row)")
        if len(routing.names) != x.shape[0]:
            raise ConfigError(f"adapter_per_row has {len(routing.names)} names for a batch of {x.shape[0]} rows")
        for name, rows in routing.rows_by_adapter.items():
            if name not in self.adapters:
                continue
            index = torch.tensor(rows, device=x.device)
            delta = self._delta(self.adapters[name], x.index_select(0, index), 1.0)
            result = result.index_add(0, index, delta.to(result.dtype))
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` of adapter ``name`` in the layout and dtype of the base weight."""
        adapter = self.adapters[name]
        weight = self.base_layer.weight
        return (self.kind.delta_weight(adapter.A, adapter.B) * adapter.scale).to(weight.dtype)

    @torch.no_grad()
    def merge(self, name: str, weight: float) -> None:
        """Make adapter ``name`` merged at ``weight``: add ``(weight - already merged) * s B A`` to the base
        weight, so merging twice changes nothing. Refuses (and changes nothing) if the result is not finite."""
        step = weight - self.merged.get(name, 0.0)
        if step == 0.0:
            return
        base_weight = self.base_layer.weight
        merged = base_weight + self.delta_weight(name) * step
        if not torch.isfinite(merged).all():
            raise StateError(f"merging adapter {name!r} would make the weight non-finite; nothing was merged")
        base_weight.copy_(merged)
        if weight == 0.0:
            self.merged.pop(name, None)
        else:
            self.merged[name] = weight

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again."""
        for name, weight in self.merged.items():
            self.base_layer.weight.sub_(self.delta_weight(name) * weight)
        self.merged.clear()
