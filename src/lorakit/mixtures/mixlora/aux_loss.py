"""MixLoRA's load-balancing loss, in the Hugging Face Mixtral form that MoE-PEFT uses (mixtures.md §2.2).

The router logits of all MixLoRA layers are concatenated along the token axis, padding left out:

    L_aux = E * sum_{slot=1..k} sum_e f_{slot,e} * P_e

with ``f_{slot,e}`` the fraction of tokens whose slot-th choice is expert e and ``P_e`` the mean
softmax probability of e. Perfectly uniform routing gives ``L_aux = k``. The training objective is
``CE_LM + c * L_aux`` (Li et al. 2024, arXiv 2404.15159; the paper writes the Switch form, f over
the top-1 choice only). ``c`` defaults to MoE-PEFT's code default 0.001; the paper uses 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.errors import ConfigError


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_aux`` of per-layer logits, each ``(..., E)``; ``mask`` (the attention mask, same leading shape as
    every layer's logits) leaves padding out: 0 entries count for nothing."""
    num_experts = router_logits[0].shape[-1]
    if mask is not None and any(layer.shape[:-1] != mask.shape for layer in router_logits):
        raise ConfigError(f"the mask's shape {tuple(mask.shape)} does not match the router logits' "
                          f"{[tuple(layer.shape[:-1]) for layer in router_logits]}")
    logits = torch.cat([layer.reshape(-1, num_experts) for layer in router_logits]).float()  # (L*N, E)
    probs = torch.softmax(logits, dim=-1)
    picks = nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).to(probs.dtype)  # (L*N, k, E)
    if mask is None:
        token_weight = probs.new_ones(probs.shape[0])
    else:
        token_weight = mask.reshape(-1).to(probs).repeat(len(router_logits))  # layers concatenated in order
    total = token_weight.sum().clamp_min(1.0)
    fraction = (picks * token_weight[:, None, None]).sum(0) / total  # (k, E): f_{slot,e}
    mean_prob = (probs * token_weight[:, None]).sum(0) / total  # (E,): P_e
    return num_experts * (fraction * mean_prob).sum()
