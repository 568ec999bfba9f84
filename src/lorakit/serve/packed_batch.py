"""One forward over every decoding row and some prompt chunks, packed into a single sequence.

Reading prompts in a forward of their own costs a whole weight read each time; padding decode rows to a
prompt chunk's width costs that width per row. Packing costs neither: the input is one sequence ``(1, T)``,

    [next token of decoding row 1, ..., of row D] + [chunk of prompt 1] + [chunk of prompt 2] + ...

each token at its own absolute position. The linear layers see the rows through packed per-row routing
(:class:`~lorakit.core.routing.PerRowRouting` with ``lengths``); attention is the only place where rows
must not see each other, so the model runs with :func:`packed_attention`, which attends per row over the
slot caches (:class:`PackedView` wrote the new keys into the slots first):

* the ``D`` decoding rows as one batch ``(D, H, 1, d)`` over their slots' first ``L`` positions, row ``b``
  masked to the ``start_b + 1`` positions it has;
* each prompt chunk over its own slot, causally from its start (query ``t`` sees keys ``0 .. start + t``).

Only causal LMs whose attention goes through ``transformers``' attention interface and whose logits are
their head on the last hidden states can run packed (:func:`packed_parts`): the head runs on the kept
positions only. The others read prompts in forwards of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lorakit.models.supervised_loss import HEAD_ON_LAST_HIDDEN
from lorakit.serve.slot_cache import SlotCache

PACKED_ATTENTION = "lorakit_packed"


@dataclass(frozen=True)
class Chunk:
    """A prompt chunk in a packed forward: ``length`` tokens written to ``slot`` from position ``start``."""

    slot: int
    start: int
    length: int


@dataclass
class PackedLayout:
    """Where each token of a packed forward comes from: decoding rows in slots ``0 .. D - 1`` (their next
    tokens at positions ``decode_starts``), then the prompt chunks."""

    decode_starts: list[int]
    chunks: list[Chunk]
    device: torch.device
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def decoding(self) -> int:
        return len(self.decode_starts)

    def positions(self) -> torch.Tensor:
        """``(1, T)`` absolute positions of the packed tokens (the rotary embedding's ``position_ids``)."""
        spans = [torch.tensor(self.decode_starts, dtype=torch.long)]
        spans += [torch.arange(c.start, c.start + c.length) for c in self.chunks]
        return torch.cat(spans)[None].to(self.device)

    def decode_mask(self) -> torch.Tensor:
        """``(D, 1, 1, L)`` boolean: decoding row ``b`` sees its keys ``0 .. start_b``."""
        if "decode" not in self._masks:
            starts = torch.tensor(self.decode_starts, device=self.device)
            keys = torch.arange(int(starts.max()) + 1, device=self.device)
            self._masks["decode"] = (keys[None] <= starts[:, None])[:, None, None]
        return self._masks["decode"]

    def chunk_mask(self, index: int) -> torch.Tensor | None:
        """``(length, start + length)`` boolean causal mask of chunk ``index`` (None from position 0: plain causal)."""
        chunk = self.chunks[index]
        if chunk.start == 0:
            return None
        if index not in self._masks:
            query = chunk.start + torch.arange(chunk.length, device=self.device)
            self._masks[index] = torch.arange(chunk.start + chunk.length, device=self.device)[None] <= query[:, None]
        return self._masks[index]


class PackedView:
    """A packed forward's window on a :class:`SlotCache` (the ``transformers`` cache interface): ``update``
    writes each token's keys and values into its row's slot and hands back the whole buffers, which
    :func:`packed_attention` reads per row."""

    def __init__(self, cache: SlotCache, layout: PackedLayout) -> None:
        self.cache = cache
        self.layout = layout
        decode = layout.decode_starts
        self._slots = max([len(decode)] + [c.slot + 1 for c in layout.chunks])
        self._length = max([s + 1 for s in decode] + [c.start + c.length for c in layout.chunks])
        self._decode_rows = torch.arange(len(decode), device=layout.device)
        self._decode_positions = torch.tensor(decode, dtype=torch.long, device=layout.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the ``(1, H, T, d)`` new keys and values into the slots; return the ``(slots, H, capacity, d)``
        buffers."""
        cache, layout = self.cache, self.layout
        cache.ensure(layer_idx, key_states, self._slots, self._length)
        keys, values = cache.keys[layer_idx], cache.values[layer_idx]
        decoding = layout.decoding
        if decoding:
            keys[self._decode_rows, :, self._decode_positions] = key_states[0, :, :decoding].transpose(0, 1)
            values[self._decode_rows, :, self._decode_positions] = value_states[0, :, :decoding].transpose(0, 1)
        offset = decoding
        for chunk in layout.chunks:
            span = slice(chunk.start, chunk.start + chunk.length)
            keys[chunk.slot, :, span] = key_states[0, :, offset:offset + chunk.length]
            values[chunk.slot, :, span] = value_states[0, :, offset:offset + chunk.length]
            offset += chunk.length
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed explicitly; nothing reads this for a packed forward


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     packed: PackedLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of a packed forward: ``query`` ``(1, H, T, d)`` against the slot buffers ``key``/``value``
    ``(slots, H_kv, capacity, d)``; returns ``(1, T, H, d)``. Without a layout, ``transformers``' SDPA."""
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    decoding = packed.decoding
    if decoding:
        mask = packed.decode_mask()
        rows = query[0, :, :decoding].transpose(0, 1)[:, :, None]  # (D, H, 1, d)
        window = slice(0, mask.shape[-1])
        out = F.scaled_dot_product_attention(rows, key[:decoding, :, window], value[:decoding, :, window],
                                             attn_mask=mask, scale=scaling, enable_gqa=gqa)  # (D, H, 1, d)
        outputs.append(out[:, :, 0][None])  # (1, D, H, d)
    offset = decoding
    for index, chunk in enumerate(packed.chunks):
        rows = query[:, :, offset:offset + chunk.length]  # (1, H, length, d)
        seen = slice(0, chunk.start + chunk.length)
        mask = packed.chunk_mask(index)
        out = F.scaled_dot_product_attention(rows, key[chunk.slot:chunk.slot + 1, :, seen],
                                             value[chunk.slot:chunk.slot + 1, :, seen], attn_mask=mask,
                                             is_causal=mask is None, scale=scaling, enable_gqa=gqa)
        outputs.append(out.transpose(1, 2))  # (1, length, H, d)
        offset += chunk.length
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def packed_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` of a causal LM that can run packed: its attention layers call ``transformers``' attention
    interface, and its logits are its head applied to the body's last hidden states (so the head runs on the
    kept positions only, with routing of their own). None for any other model."""
    config = getattr(model, "config", None)
    if not getattr(model, "_supports_attention_backend", False) or not hasattr(config, "_attn_implementation"):
        return None
    if getattr(config, "model_type", None) not in HEAD_ON_LAST_HIDDEN:
        return None
    head, body = model.get_output_embeddings(), getattr(model, "base_model", model)
    return None if head is None or body is model else (body, head)


@contextlib.contextmanager
def packed_attention_on(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model``'s attention is :func:`packed_attention` (SDPA for forwards without a layout)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
