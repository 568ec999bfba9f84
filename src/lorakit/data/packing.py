"""Packing: several encoded examples in one row, each attending only to itself.

A packed row concatenates examples; its ``position_ids`` restart at 0 at every example. Given
``position_ids`` and no ``attention_mask``, transformers' causal-mask builder (``masking_utils``)
detects the restarts and gives each example its own causal block, so examples in a pack never
attend to each other and their logits equal those of running them alone. transformers does this
only when the forward pass builds no KV cache: call the model with ``use_cache=False``
(otherwise the examples of a row attend to the earlier ones). Padding at the end of a row is one
more block, with labels ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.encoding import IGNORE_INDEX, Encoded
from lorakit.errors import DataError


@dataclass(frozen=True, kw_only=True)
class Pack:
    """Encoded examples that share one row."""

    examples: tuple[Encoded, ...]
    """The examples, in row order."""

    def __len__(self) -> int:
        return sum(len(example) for example in self.examples)


def pack(examples: Sequence[Encoded], max_length: int) -> list[Pack]:
    """Pack ``examples`` in their order, greedily: a pack is closed when the next one does not fit.

    Every example must hold between 1 and ``max_length`` tokens (encode with ``max_length``).
    """
    if max_length < 1:
        raise DataError(f"the pack length must be a positive number of tokens, got {max_length}")
    packs: list[Pack] = []
    current: list[Encoded] = []
    used = 0
    for index, example in enumerate(examples):
        if not 1 <= len(example) <= max_length:
            raise DataError(
                f"example {index} has {len(example)} tokens; packing into rows of {max_length} "
                f"needs 1 to {max_length} (encode with max_length={max_length})"
            )
        if used + len(example) > max_length:
            packs.append(Pack(examples=tuple(current)))
            current, used = [], 0
        current.append(example)
        used += len(example)
    if current:
        packs.append(Pack(examples=tuple(current)))
    return packs


def collate_packed(packs: Sequence[Pack], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packs into ``{"input_ids", "position_ids", "labels"}``, LongTensors ``(B, T)``.

    There is deliberately no ``attention_mask``: the restarting ``position_ids`` define attention
    (see the module docstring; run the model with ``use_cache=False``). Each example's first label
    is ``IGNORE_INDEX``: the model predicts token ``i`` from position ``i - 1``, which for a first
    token is the end of the previous example (unpacked, a first token is never predicted either).
    """
    if not packs:
        raise DataError("cannot collate an empty list of packs")
    width = max(len(p) for p in packs)
    input_ids, positions, labels = [], [], []
    for p in packs:
        pad = width - len(p)
        input_ids.append([t for e in p.examples for t in e.input_ids] + [pad_id] * pad)
        labels.append([t for e in p.examples for t in _own_labels(e)] + [IGNORE_INDEX] * pad)
        positions.append([i for e in p.examples for i in range(len(e))] + list(range(pad)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _own_labels(example: Encoded) -> list[int]:
    """The example's labels with the first one ignored: nothing in the example predicts it."""
    return [IGNORE_INDEX] + example.labels[1:]
