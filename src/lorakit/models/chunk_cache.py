"""The key/value cache of one chunk's forward in chunk-wise training (SeCO, :mod:`lorakit.train.chunked`).

A decoder's attention hands each layer's new keys and values to ``cache.update`` and attends over what it
returns. :class:`ChunkCache` returns ``cat(prefix, new)`` along the sequence, where ``prefix`` holds the
earlier chunks' keys and values (given, for example as leaves that collect their gradients), and keeps the
chunk's own ``new`` keys and values, as the forward computed them, for the caller: stored after a forward
without gradients, or given a gradient of their own in the backward.

:func:`chunk_forward_inputs` gives the rest of one chunk's inputs: its position ids and the additive attention
mask over the prefix and the chunk (causal, and within one packed example only).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache

from lorakit.errors import ConfigError

KeyValues = tuple[torch.Tensor, torch.Tensor]
"""One layer's keys and values, each ``(B, H_kv, T, D)``."""


class ChunkCache(Cache):
    """The cache of one chunk's forward: layer ``l`` attends over ``cat(prefix[l], new)``; ``own[l]`` is the
    chunk's ``new`` keys and values afterwards. ``prefix`` is None for the first chunk."""

    def __init__(self, prefix: list[KeyValues] | None) -> None:
        super().__init__(layers=[])
        self.prefix = prefix
        self.own: dict[int, KeyValues] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> KeyValues:
        self.own[layer_idx] = (key_states, value_states)  # recomputed by checkpointing: the same values again
        if self.prefix is None:
            return key_states, value_states
        keys, values = self.prefix[layer_idx]
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.prefix is None else self.prefix[layer_idx][0].shape[2]

    def own_layers(self, layers: int) -> list[KeyValues]:
        """The chunk's own keys and values of each of the model's ``layers`` layers, in order; a model whose
        attention did not hand every layer's keys and values to the cache is refused."""
        if sorted(self.own) != list(range(layers)):
            raise ConfigError(f"chunk-wise training needs a decoder whose {layers} attention layers each hand their "
                              f"keys and values to transformers' cache once per forward; this model's did for layers "
                              f"{sorted(self.own)} (mixtures with several passes, and custom attention, are not "
                              "supported)")
        return [self.own[index] for index in range(layers)]


def segments(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which example each position belongs to, ``(B, T)``: packed rows restart their ``position_ids`` at 0 for
    each example (and for the padding at the end); a padded row is one example and its padding another."""
    if "position_ids" in batch:
        return torch.cumsum(batch["position_ids"] == 0, dim=1)
    return 1 + (batch["attention_mask"] == 0).long()


def chunk_forward_inputs(batch: dict[str, torch.Tensor], start: int, end: int, dtype: torch.dtype,
                         device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids`` ``(B, end - start)`` and the additive ``attention_mask`` ``(B, 1,
    end - start, end)`` of positions ``start .. end - 1`` of ``batch`` attending to positions ``0 .. end - 1``:
    0 where a key is at or before the query in the same example, the dtype's lowest value elsewhere (every query
    sees at least itself, so no row is empty)."""
    ids = batch["input_ids"]
    positions = batch["position_ids"] if "position_ids" in batch else \
        torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    segment = segments(batch)
    queries, keys = torch.arange(start, end), torch.arange(end)
    allowed = (keys[None, :] <= queries[:, None])[None] & \
        (segment[:, start:end, None] == segment[:, None, :end])  # (B, Tq, Tk)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"input_ids": ids[:, start:end].to(device), "position_ids": positions[:, start:end].to(device),
            "attention_mask": mask[:, None].to(device)}


def cache_keyword(body: nn.Module) -> str:
    """The name ``body.forward`` takes its KV cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
