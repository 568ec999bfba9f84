"""The KV cache of continuous batching: one slot per running sequence, rows joining and leaving freely.

Every attention layer keeps ``K`` and ``V`` buffers of shape ``(slots, kv_heads, capacity, head_dim)``;
slot ``i`` holds sequence ``i`` from position 0. A forward over the contiguous slots ``first ..
first + B - 1`` writes each row's new keys at its own length and attends over a *view* of the buffers,
``[first : first + B, :, :L]`` with ``L`` the longest row, so nothing is gathered or copied per step.
Rows shorter than ``L`` are masked by :func:`attention_mask` (row ``b``'s query at absolute position
``p`` sees keys ``0..p``), which is all that makes their rows independent of each other. Buffers grow
(doubling, up to the model's context) when a longer row or more slots are needed, and a sequence that
leaves is replaced by the last slot's (:meth:`SlotCache.move`), so the running slots stay contiguous.

:class:`SlotView` is what the model's attention layers see: ``update(keys, values, layer_idx)`` as
``transformers``' caches define it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SlotCache:
    """K/V buffers of ``slots`` sequences; created at the first write, from the shapes the model writes."""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self.keys: list[torch.Tensor] = []     # per layer (slots, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def view(self, first: int, starts: Sequence[int], new: int) -> SlotView:
        """The cache a forward over slots ``first ..`` sees, row ``b`` writing ``new`` tokens at ``starts[b]``."""
        return SlotView(self, first, list(starts), new)

    def ensure(self, layer: int, like: torch.Tensor, slots: int, length: int) -> None:
        """Buffers for ``layer`` with room for ``slots`` slots of ``length`` positions (``like``: (B, H, T, D))."""
        if length > self.context_length:
            raise ValueError(f"a sequence of {length} positions exceeds the context of {self.context_length}")
        while len(self.keys) <= layer:
            empty = like.new_zeros((0, like.shape[1], 0, like.shape[3]))
            self.keys.append(empty)
            self.values.append(empty.clone())
        self._grow(layer, slots, length)

    def _grow(self, layer: int, slots: int, length: int) -> None:
        """Enlarge ``layer``'s buffers (doubling) to hold at least ``slots`` x ``length``."""
        held = self.keys[layer]
        if held.shape[0] >= slots and held.shape[2] >= length:
            return
        grown_slots = max(slots, held.shape[0], min(2 * held.shape[0], slots + 8))
        grown_length = min(self.context_length, max(length, held.shape[2], 2 * held.shape[2], 64))
        for buffers in (self.keys, self.values):
            old = buffers[layer]
            new = old.new_zeros((grown_slots, old.shape[1], grown_length, old.shape[3]))
            new[: old.shape[0], :, : old.shape[2]] = old
            buffers[layer] = new

    def move(self, source: int, target: int, length: int) -> None:
        """Copy slot ``source``'s first ``length`` positions into slot ``target`` (every layer); nothing for an
        empty slot (a sequence that has not read any of its prompt yet)."""
        if length == 0:
            return
        for layer in range(len(self.keys)):
            self._grow(layer, target + 1, length)
            for buffers in (self.keys, self.values):
                buffers[layer][target, :, :length] = buffers[layer][source, :, :length]

    def swap(self, first: int, second: int, first_length: int, second_length: int) -> None:
        """Exchange the contents of two slots (their first ``*_length`` positions), every layer."""
        for layer in range(len(self.keys)):
            self._grow(layer, max(first, second) + 1, max(first_length, second_length))
        for buffers in (self.keys, self.values):
            for held in buffers:
                kept = held[first, :, :first_length].clone()
                held[first, :, :second_length] = held[second, :, :second_length]
                held[second, :, :first_length] = kept

    def release(self) -> None:
        """Drop every buffer (the lane is idle)."""
        self.keys, self.values = [], []


class SlotView:
    """One forward's window on a :class:`SlotCache` (the ``transformers`` cache interface)."""

    def __init__(self, cache: SlotCache, first: int, starts: list[int], new: int) -> None:
        self.cache = cache
        self.first = first
        self.starts = starts
        self.new = new
        self.length = max(starts) + new
        self._rows = torch.arange(first, first + len(starts))
        self._positions = torch.tensor(starts)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``(B, H, new, D)`` keys and values at each row's start; return the rows' ``(B, H, L, D)``."""
        cache, rows = self.cache, len(self.starts)
        cache.ensure(layer_idx, key_states, self.first + rows, self.length)
        keys, values = cache.keys[layer_idx], cache.values[layer_idx]
        if self.new == 1:  # decoding: one token per row, each at its own position, in one indexed write
            if self._rows.device != keys.device:
                self._rows, self._positions = self._rows.to(keys.device), self._positions.to(keys.device)
            keys[self._rows, :, self._positions] = key_states[:, :, 0].to(keys.dtype)
            values[self._rows, :, self._positions] = value_states[:, :, 0].to(values.dtype)
        else:
            for row, start in enumerate(self.starts):
                keys[self.first + row, :, start:start + self.new] = key_states[row]
                values[self.first + row, :, start:start + self.new] = value_states[row]
        window = slice(self.first, self.first + rows)
        return keys[window, :, : self.length], values[window, :, : self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached before this forward (part of the cache interface; lorakit passes positions itself)."""
        return self.length - self.new


def attention_mask(starts: Sequence[int], new: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(B, 1, new, L)`` additive mask: row ``b``'s query ``t`` (at position ``starts[b] + t``) sees the keys at
    positions ``0 .. starts[b] + t``; everything else (later keys, other sequences' leftovers) is ``-inf``."""
    length = max(starts) + new
    query = torch.tensor(starts, device=device)[:, None] + torch.arange(new, device=device)  # (B, new)
    allowed = torch.arange(length, device=device)[None, None, :] <= query[:, :, None]  # (B, new, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def positions(starts: Sequence[int], new: int, device: torch.device) -> torch.Tensor:
    """``(B, new)`` absolute positions of the new tokens (the rotary embedding's ``position_ids``)."""
    return torch.tensor(starts, device=device)[:, None] + torch.arange(new, device=device)
