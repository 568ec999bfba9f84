"""The spine of lorakit: a base layer wrapped with any number of named LoRA adapters.

``LoraLayer(base_layer)`` keeps the original module as ``self.base_layer`` and its adapters in one
``nn.ModuleDict``. Each forward reads the model's shared :class:`RoutingState`:

* static routing (the active set with weights ``w_i``, negative allowed), computed here:
  ``h = W0 x + sum_i w_i s_i B_i A_i drop_i(x)``;
* per-row routing (mixed batches, :mod:`lorakit.core.per_row`): row ``b`` gets ``s_j B_j A_j x_b`` for
  its own adapter ``j``, or nothing for ``None``;
* dense and sparse per-token routing (X-LoRA, MeteoRA; :mod:`lorakit.core.per_token`):
  ``h = W0 x + g sum_n w_n s_n B_n A_n x`` with per-token weights ``w``, over every expert or each
  token's top-k.

Merging folds ``w s B A`` into ``W0`` and records the weight; the forward then subtracts whatever
the routing does not ask for, so merging never changes what the model computes, only where.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.adapter import LoraAdapter
from lorakit.core.kinds import LayerKind
from lorakit.core.per_row import add_per_row_delta
from lorakit.core.per_token import add_expert_delta
from lorakit.core.routing import NO_ADAPTERS, PerRowRouting, RoutingState, StaticRouting
from lorakit.errors import StateError


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
        self.epoch = 0
        """Counts the adapters added and removed, so that what is derived from the set can be cached."""
        self.stacks: dict[str, tuple] = {}
        """Stacked factors the per-row and dense paths reuse without autograd (:mod:`lorakit.core.stack_cache`)."""
        self.train(base_layer.training)  # a layer wrapped in an eval-mode model stays in eval mode

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        return f"kind={self.kind.name}{merged}"

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Create adapter ``name`` shaped by ``config`` (after its rank/alpha patterns for ``module_name``), in
        this layer's training mode: its dropout acts only if the model is training."""
        adapter = LoraAdapter(
            self.base_layer, self.kind, rank=config.rank_for(module_name), alpha=config.alpha_for(module_name),
            scale=config.scale_for(module_name), dropout=config.dropout, init=config.init, rslora=config.use_rslora)
        self.adapters[name] = adapter.train(self.training)
        self.epoch += 1

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` from this layer."""
        del self.adapters[name]
        self.epoch += 1

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self.routing.current()
        if not isinstance(routing, StaticRouting):  # this call's own routing: a mixed batch or a mixture
            if isinstance(routing, PerRowRouting):
                return add_per_row_delta(self, x, result, routing)
            result = add_expert_delta(self, x, result, routing)
            routing = NO_ADAPTERS  # what is merged is still taken out below
        if not routing.weights and not self.merged:
            return result
        for name, weight in self._static_weights(routing).items():
            code, B, scale = self._code(self.adapters[name], x)
            result = self.kind.add_up(result, code, B, weight * scale)
        return result

    def adapter_delta(self, name: str, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Adapter ``name``'s contribution to this layer's output for input ``x``, ``weight * s B A drop(x)``,
        alone (without the base layer) and in the adapter's dtype: for paths that run the base once and add
        chosen adapters' deltas (mixed batches, mixtures, MixLoRA's experts)."""
        code, B, scale = self._code(self.adapters[name], x)
        return self.kind.up(code, B) * (weight * scale)

    def _static_weights(self, routing: StaticRouting) -> dict[str, float]:
        """Each adapter's weight in this forward, less what merging already put in the base weight."""
        weights = {n: w for n, w in routing.weights.items() if n in self.adapters and w != 0.0}
        if not self.merged:
            return weights
        for name, merged_weight in self.merged.items():
            weights[name] = weights.get(name, 0.0) - merged_weight
        return {n: w for n, w in weights.items() if w != 0.0}

    def _code(self, adapter: LoraAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``down(drop(x), A)`` in the adapter's dtype, with the ``B`` and scale that turn it into a delta."""
        A, B, scale = adapter.factors()
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        return self.kind.down(self.base_layer, adapter.drop(x), A), B, scale

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` of adapter ``name`` in the layout and dtype of the base weight."""
        A, B, scale = self.adapters[name].factors()
        return (self.kind.delta_weight(A, B) * scale).to(self.base_layer.weight.dtype)

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
