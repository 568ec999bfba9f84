"""A decoder block's FFN as a mixture of LoRA experts that share its frozen weights (MixLoRA).

For a token x routed to experts ``i_1..i_k`` with renormalised weights ``w_j`` (:mod:`.router`):

    y = sum_j w_j E_{i_j}(x),   E_i(x) = W'_{2,i}(act(W'_{1,i} x) * W'_{3,i} x),   W'_{m,i} x = W_m x + Delta_{m,i}(x)

where ``W_1, W_3, W_2`` are the frozen gate, up and down projections and ``Delta_{m,i}`` expert i's LoRA
term on projection m (Li et al. 2024, arXiv 2404.15159). The shared computation: ``W_1 x`` and ``W_3 x``
run once for all tokens; each expert then gathers its tokens (sorted by expert, as the core layer's
sparse path does), adds its own deltas, runs ``W_2`` once on its gathered activations, and the weighted
results are added back to their tokens. The experts are ordinary lorakit adapters on the projections;
they are not in the model's active set, so only this module applies them.

The projections and ``act_fn`` are registered here under their original names, so every module path
(``...mlp.gate_proj``) stays as it was: saved experts are plain PEFT adapters of the base model. Each
forward records its router logits under :data:`ROUTER_LOGITS` (:mod:`lorakit.core.records`), in layer
order, for the load-balancing loss.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.layer import LoraLayer
from lorakit.core.records import record
from lorakit.errors import StateError
from lorakit.mixtures.mixlora.config import MixLoraConfig
from lorakit.mixtures.mixlora.router import dense_weights, jitter, top_k_routing

ROUTER_LOGITS = "mixlora.router_logits"
"""The record key of each MixLoRA FFN's ``(..., E)`` fp32 router logits (all tokens)."""


class MixLoraFFN(nn.Module):
    """A gated FFN whose LoRA experts are mixed per token by a top-k router (see the module docstring)."""

    def __init__(self, ffn: nn.Module, config: MixLoraConfig, experts: list[str], router: nn.Module) -> None:
        super().__init__()
        self.gate_proj: LoraLayer = ffn.gate_proj
        self.up_proj: LoraLayer = ffn.up_proj
        self.down_proj: LoraLayer = ffn.down_proj
        self.act_fn = ffn.act_fn
        self.router = router
        """``W_g`` (:class:`.router.Router`): logits (..., E) in fp32."""
        self.config = config
        self.experts = list(experts)
        """Expert adapter names; position i is the router's output i."""

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, top_k={self.config.top_k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x, sparse=True)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same output as ``forward``, with every expert run on every token (weight 0 outside its top-k):
        the reference the sparse path is tested against."""
        return self._mix(x, sparse=False)

    def _mix(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        routing = self.gate_proj.routing
        if routing.call is not None:
            raise StateError("MixLoRA FFNs route their own experts; per-call routing (mixed batches, "
                             "dense or sparse overrides) is not supported on a MixLoRA model")
        if any(layer.merged for layer in (self.gate_proj, self.up_proj, self.down_proj)):
            raise StateError("an adapter is merged into a MixLoRA FFN projection; unmerge it first")
        if routing.disabled:  # the base model: the shared weights without any expert
            return self.down_proj.base_layer(self.act_fn(self.gate_proj.base_layer(x)) * self.up_proj.base_layer(x))
        if self.training and self.config.jitter_noise > 0:
            x = jitter(x, self.config.jitter_noise)
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        logits = self.router(flat)  # (N, E), fp32
        record(ROUTER_LOGITS, logits.reshape(*x.shape[:-1], logits.shape[-1]))  # (..., E): the balancing loss
        weights, chosen = top_k_routing(logits, self.config.top_k)  # (N, k) each
        gate, up = self.gate_proj.base_layer(flat), self.up_proj.base_layer(flat)  # once for all experts
        if sparse:
            out = self._sparse(flat, gate, up, weights, chosen)
        else:
            out = self._dense(flat, gate, up, dense_weights(weights, chosen, len(self.experts)))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _expert(self, name: str, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``E_i(x)`` from the shared ``W_1 x`` and ``W_3 x`` of the same tokens."""
        gate = gate + self.gate_proj.adapter_delta(name, x).to(gate.dtype)
        up = up + self.up_proj.adapter_delta(name, x).to(up.dtype)
        hidden = self.act_fn(gate) * up  # (n, I)
        return self.down_proj.base_layer(hidden) + self.down_proj.adapter_delta(name, hidden).to(hidden.dtype)

    def _sparse(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor,
                chosen: torch.Tensor) -> torch.Tensor:
        """Each expert on its own tokens only: (token, slot) pairs sorted by expert, one slice each."""
        k = chosen.shape[-1]
        pair_expert = chosen.reshape(-1)  # (N * k,)
        order = pair_expert.argsort(stable=True)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(k).index_select(0, order)
        counts = torch.bincount(pair_expert, minlength=len(self.experts)).tolist()
        parts, start = [], 0
        for name, count in zip(self.experts, counts, strict=True):
            if count:
                index = tokens[start:start + count]
                parts.append(self._expert(name, x.index_select(0, index), gate.index_select(0, index),
                                          up.index_select(0, index)))
                start += count
        weighted = torch.cat(parts) * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(parts[0].dtype)
        return weighted.new_zeros(x.shape[0], weighted.shape[-1]).index_add(0, tokens, weighted)

    def _dense(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by ``(N, E)`` weights that are zero outside the top-k."""
        out = 0.0
        for column, name in enumerate(self.experts):
            out = out + self._expert(name, x, gate, up) * weights[:, column:column + 1].to(gate.dtype)
        return out
