"""MixLoRA's router arithmetic: from router logits to each token's top-k experts and their weights.

``p = softmax(W_g x)`` over the E experts in fp32; ``(v, i) = top_k(p)``; ``w = v / sum(v)``. The
renormalised weights sum to 1, so while every expert equals the base FFN (B = 0 at initialisation)
the mixture is the base FFN exactly (Li et al. 2024, arXiv 2404.15159, §3).
"""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Linear):
    """``W_g``: ``Linear(H, E)`` without bias whose logits are computed in fp32 whatever the model's dtype
    (its weight is created in fp32 and cast back up if the model is cast down)."""

    def __init__(self, hidden_size: int, num_experts: int, device: torch.device | None = None) -> None:
        super().__init__(hidden_size, num_experts, bias=False, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.weight.float())  # (..., E)


def top_k_routing(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)``, both ``(..., k)``: each token's k most probable experts and their
    renormalised probabilities (fp32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, experts = probs.topk(top_k, dim=-1)
    return values / values.sum(dim=-1, keepdim=True), experts


def dense_weights(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The same routing as ``(..., E)`` weights, zero outside each token's top-k."""
    return weights.new_zeros(*weights.shape[:-1], num_experts).scatter(-1, experts, weights)


def jitter(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``x * U(1 - epsilon, 1 + epsilon)`` elementwise (Mixtral's router jitter)."""
    return x * torch.empty_like(x).uniform_(1.0 - epsilon, 1.0 + epsilon)
