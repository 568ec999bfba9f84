"""The X-LoRA classifier ("scaling head"): hidden states -> per-token, per-layer expert scalings.

``logits = MLP(h)`` with ``h`` the scaling pass's last hidden state ``(B, S, H)``; reshaped to
``(B, S, L, N)`` (or broadcast over L without layerwise scalings), then
``sigma = softmax(logits / T)`` over the N experts. The layout of ``layers`` equals PEFT's
``internal_xlora_classifier.layers``, so weights move between the two unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.mixtures.xlora.config import XLoraConfig


class XLoraClassifier(nn.Module):
    """An MLP from hidden size H to N expert scalings for each of L adapted modules."""

    def __init__(self, hidden_size: int, n_experts: int, n_layers: int, config: XLoraConfig) -> None:
        super().__init__()
        self.n_experts, self.n_layers, self.config = n_experts, n_layers, config
        width = n_experts * n_layers if config.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        size_in = hidden_size
        for _ in range(config.depth - 1):
            layers += [nn.Linear(size_in, config.size), nn.ReLU()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            size_in = config.size
        layers.append(nn.Linear(size_in, width))
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalings ``(B, S, L, N)`` for hidden states ``(B, S, H)``."""
        logits = self.layers(hidden)
        batch, seq = hidden.shape[:2]
        if self.config.layerwise_scalings:
            logits = logits.reshape(batch, seq, self.n_layers, self.n_experts)
        else:
            logits = logits.unsqueeze(2).expand(batch, seq, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            logits = torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        return logits


def keep_top_k(scalings: torch.Tensor, k: int, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest scalings as ``(indices, values)``, both ``(..., k)``.

    With ``softmax`` the kept values are renormalised by a softmax over themselves (PEFT's
    ``enable_softmax_topk``); otherwise they are kept as they are.
    """
    values, indices = scalings.topk(k, dim=-1)
    if softmax:
        values = torch.softmax(values, dim=-1)
    return indices, values
