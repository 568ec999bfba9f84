"""Grouped-query attention without repeating the keys and values, for chunk-wise training.

transformers' SDPA attention gives each query head its own copy of its key/value head (``repeat_kv``) whenever
there is a mask, and autograd keeps those copies for the backward: with SmolLM2's 9 query and 3 key/value heads,
three times the keys and values a chunk attends over, which for a chunk at the end of a long sequence is most of
what chunk-wise training holds (:mod:`lorakit.train.chunked`). Folding the ``g`` query heads that share a key/value
head into the query length instead, ``(B, H_kv * g, T, D) -> (B, H_kv, g * T, D)``, with the mask's rows repeated
``g`` times, computes the same attention over the un-repeated keys and values (each query row still sees exactly
its own head's keys, under its own mask row).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GROUPED_SDPA = "lorakit_grouped_sdpa"
"""The name the attention is registered under in transformers' ``AttentionInterface``."""


def grouped_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` ``(B, H, T, D)``, ``key``/``value`` ``(B, H_kv, S, D)``,
    an additive or boolean ``attention_mask`` ``(B, 1, T, S)``; returns ``(B, T, H, D)``. Without grouped heads or a
    mask, transformers' own SDPA attention."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1 or attention_mask is None or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    folded = query.reshape(batch, key.shape[1], groups * length, dim)  # rows: (head in group, position)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=_folded_mask(attention_mask, groups),
                                         dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _folded_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``mask`` ``(B, 1, T, S)`` with its rows repeated ``groups`` times, ``(B, 1, g * T, S)``: made once per mask and
    kept on it, so that every layer of a forward attends with (and keeps for its backward) the same tensor."""
    folded = getattr(mask, "_lorakit_folded", None)
    if folded is None or folded.shape[2] != groups * mask.shape[2]:
        folded = mask.repeat(1, 1, groups, 1)
        mask._lorakit_folded = folded
    return folded


@contextlib.contextmanager
def grouped_query_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, a model that attends with transformers' SDPA attention attends with
    :func:`grouped_sdpa_forward` instead (the same numbers, up to rounding); any other is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)
    config._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
