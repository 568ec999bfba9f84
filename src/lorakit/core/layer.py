"""The spine of lorakit: a base layer wrapped with any number of named LoRA adapters.

``LoraLayer(base_layer)`` keeps the original module as ``self.base_layer`` and its adapters in one
``nn.ModuleDict``. Each forward reads the model's shared :class:`RoutingState`:

* static routing (the active set with weights ``w_i``, negative allowed):
  ``h = W0 x + sum_i w_i s_i B_i A_i drop_i(x)``;
* per-row routing (mixed batches): row ``b`` gets ``s_j B_j A_j x_b`` for its own adapter ``j``,
  or nothing for ``None``;
* dense routing (X-LoRA): ``h = W0 x + g sum_n w_n s_n B_n A_n x`` with per-token weights ``w``;
* sparse routing (top-k): the same sum over each token's selected experts only.

Merging folds ``w s B A`` into ``W0`` and records the weight; the forward then subtracts whatever
the routing does not ask for, so merging never changes what the model computes, only where.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.adapter import LoraAdapter
from lorakit.core.kinds import Conv2dKind, EmbeddingKind, LayerKind
from lorakit.core.per_row import per_row_delta, stacked_factors
from lorakit.core.stack_cache import cached_without_grad, factors_key
from lorakit.core.routing import NO_ADAPTERS, DenseRouting, PerRowRouting, RoutingState, SparseRouting, StaticRouting
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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self.routing.current()
        if isinstance(routing, PerRowRouting):
            return self._per_row(x, result, routing)
        if isinstance(routing, (DenseRouting, SparseRouting)):
            delta = self._mixture_delta(x, routing)
            if torch.is_tensor(delta):  # 0.0 when no expert of this layer is routed
                result = result + delta.to(result.dtype)
            routing = NO_ADAPTERS  # what is merged is still taken out below
        if not routing.weights and not self.merged:
            return result
        for name, weight in self._static_weights(routing).items():
            code, B, scale = self._code(self.adapters[name], x)
            result = self.kind.add_up(result, code, B, weight * scale)
        return result

    def adapter_delta(self, name: str, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Adapter ``name``'s contribution to this layer's output for input ``x``, ``weight * s B A x``, alone
        (without the base layer): for mixtures that run the base once and add chosen adapters' deltas."""
        return self._delta(self.adapters[name], x, weight)

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

    def _delta(self, adapter: LoraAdapter, x: torch.Tensor, weight: float) -> torch.Tensor:
        """``weight * s * up(down(drop(x), A), B)``, computed in the adapter's dtype."""
        code, B, scale = self._code(adapter, x)
        return self.kind.up(code, B) * (weight * scale)

    def _per_row(self, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting) -> torch.Tensor:
        """Mixed batch: add each row's own adapter delta (:mod:`lorakit.core.per_row`)."""
        if self.merged:
            raise StateError(f"adapters {sorted(self.merged)} are merged into the base weights; unmerge "
                             "them before running a mixed batch (adapter_per_row)")
        if len(routing.names) != x.shape[0]:
            raise ConfigError(f"adapter_per_row has {len(routing.names)} names for a batch of {x.shape[0]} rows")
        held = [name for name in routing.rows_by_adapter if name in self.adapters]
        if not held:
            return result
        if len(held) == 1 and len(routing.rows_by_adapter[held[0]]) == x.shape[0]:  # one adapter for all rows
            return result + self._delta(self.adapters[held[0]], x, 1.0).to(result.dtype)
        adapters = [self.adapters[name] for name in held]
        dropping = self.training and any(a.dropout > 0 for a in adapters)
        if isinstance(self.kind, (EmbeddingKind, Conv2dKind)) or dropping:
            return self._per_row_by_adapter(x, result, routing, held)
        stacked_A, stacked_B = stacked_factors(adapters, self.__dict__)
        delta = per_row_delta(x, routing.slots(held, x.device), stacked_A, stacked_B)
        return result + delta.to(result.dtype)

    def _per_row_by_adapter(self, x: torch.Tensor, result: torch.Tensor, routing: PerRowRouting,
                            held: list[str]) -> torch.Tensor:
        """The mixed batch one gather/scatter per adapter (embeddings, convolutions, per-adapter dropout)."""
        for name in held:
            index = torch.tensor(routing.rows_by_adapter[name], device=x.device)
            delta = self._delta(self.adapters[name], x.index_select(0, index), 1.0)
            result = result.index_add(0, index, delta.to(result.dtype))
        return result

    def _mixture_delta(self, x: torch.Tensor, routing: DenseRouting | SparseRouting) -> torch.Tensor | float:
        """The routed experts' delta for every token of ``x`` (0 where the router leaves this layer out)."""
        if isinstance(self.kind, Conv2dKind):
            raise StateError("per-token expert routing applies to Linear, Conv1D and Embedding layers, not Conv2d")
        if isinstance(routing, DenseRouting):
            weights = routing.weights(self, x)
            return 0.0 if weights is None else self._dense(x, routing, weights)
        selection = routing.select(self, x)
        return 0.0 if selection is None else self._sparse(x, routing, *selection)

    def _dense(self, x: torch.Tensor, routing: DenseRouting, weights: torch.Tensor) -> torch.Tensor | float:
        """``g sum_n w_n s_n B_n (A_n x)`` with the experts stacked: ``A = [s_1 A_1; ...; s_N A_N]`` (R x d_in)
        and ``B = [B_1 ... B_N]`` (d_out x R), so ``delta = g B ((A x) * w_{n(j)})`` where rank column j
        belongs to expert ``n(j)``: two matrix products per layer, however many experts."""
        present = [(column, name) for column, name in enumerate(routing.names) if name in self.adapters]
        if not present:
            return 0.0
        if self.training and any(self.adapters[name].dropout > 0 for _, name in present):
            return self._dense_with_dropout(x, routing, weights, present)
        A, B, owner = self._stacked(present)
        inputs = x.to(A.dtype) if x.is_floating_point() else x
        code = self.kind.down(self.base_layer, inputs, A)  # (..., R), scales already folded into A
        delta = self.kind.up(code * weights.index_select(-1, owner).to(code.dtype), B)
        return delta if routing.scale == 1.0 else delta * routing.scale

    def _dense_with_dropout(self, x: torch.Tensor, routing: DenseRouting, weights: torch.Tensor,
                            present: list[tuple[int, str]]) -> torch.Tensor:
        """The dense sum one expert at a time, each with its own dropout mask on the input."""
        delta = 0.0
        for column, name in present:
            part = self._delta(self.adapters[name], x, routing.scale)
            delta = delta + part * weights[..., column:column + 1].to(part.dtype)
        return delta

    def _stacked(self, present: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts' scaled factors stacked along the rank, and each rank column's expert column.

        Without autograd the stack is kept until an expert's parameters change (their versions move)."""
        adapters = [self.adapters[name] for _, name in present]

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            factors = [a.factors() for a in adapters]
            owner = [column for (column, _), (A, _, _) in zip(present, factors) for _ in range(A.shape[0])]
            return (torch.cat([A * scale for A, _, scale in factors], dim=0),
                    torch.cat([B for _, B, _ in factors], dim=1), torch.tensor(owner, device=adapters[0].A.device))

        key = (tuple(column for column, _ in present), factors_key(adapters))
        return cached_without_grad(self.__dict__, "_stack", key, build)

    def _sparse(self, x: torch.Tensor, routing: SparseRouting, indices: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor | float:
        """The dense sum restricted to each token's selected experts, as a grouped product: the
        (token, expert) pairs are sorted by expert, each expert runs once on its contiguous slice of
        gathered inputs, and the weighted results are added back to their tokens."""
        k = indices.shape[-1]
        flat_x = x.reshape(-1, x.shape[-1]) if x.is_floating_point() else x.reshape(-1)
        local = [name if name in self.adapters else None for name in routing.names]
        held = torch.tensor([name is not None for name in local], device=indices.device)
        pair_expert = indices.reshape(-1)  # (T * k,)
        pair_token = torch.arange(flat_x.shape[0], device=indices.device).repeat_interleave(k)
        pair_value = values.reshape(-1)
        keep = held[pair_expert].nonzero().squeeze(-1)
        if keep.numel() == 0:
            return 0.0
        order = pair_expert.index_select(0, keep).argsort(stable=True)
        chosen = keep.index_select(0, order)
        tokens = pair_token.index_select(0, chosen)
        counts = torch.bincount(pair_expert.index_select(0, chosen), minlength=len(local)).tolist()
        inputs = flat_x.index_select(0, tokens)
        parts, start = [], 0
        for name, count in zip(local, counts):
            if count:
                parts.append(self._delta(self.adapters[name], inputs[start:start + count], routing.scale))
                start += count
        weighted = torch.cat(parts) * pair_value.index_select(0, chosen).unsqueeze(-1).to(parts[0].dtype)
        delta = weighted.new_zeros((flat_x.shape[0], weighted.shape[-1])).index_add_(0, tokens, weighted)
        return delta.reshape(*indices.shape[:-1], delta.shape[-1])

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
