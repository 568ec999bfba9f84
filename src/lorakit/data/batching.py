"""Padded training batches in a reproducible order, resumable at any batch.

The order of an epoch is a pure function of ``(seed, epoch)`` (:func:`batch_order`), so a trainer
that saved its :class:`Position` resumes mid-epoch with exactly the batches an uninterrupted run
would have seen. Batches are right-padded (:func:`collate`); with packing, rows hold several
examples (:mod:`lorakit.data.packing`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lorakit.data.encoding import IGNORE_INDEX, Encoded
from lorakit.data.packing import Pack, collate_packed, pack
from lorakit.errors import DataError


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where a pass over the data stands: batch ``batch`` of epoch ``epoch`` (both from 0)."""

    epoch: int = 0
    """The epoch."""
    batch: int = 0
    """The index of the batch within the epoch."""

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.batch < 0:
            raise DataError(f"a data position needs epoch >= 0 and batch >= 0, got {self}")

    def following(self, batches_per_epoch: int) -> Position:
        """The position of the next batch (the first of the next epoch after the last one)."""
        if self.batch + 1 >= batches_per_epoch:
            return Position(epoch=self.epoch + 1, batch=0)
        return Position(epoch=self.epoch, batch=self.batch + 1)


def batch_order(
    n_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    lengths: Sequence[int] | None = None,
    bucket_batches: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; a pure function of its arguments.

    The examples are shuffled with a generator seeded by ``(seed, epoch)`` and cut into batches.
    With ``lengths`` (length bucketing), each chunk of ``bucket_batches`` batches is sorted by
    length before it is cut, so a batch holds examples of similar length (less padding), and the
    order of all batches is shuffled afterwards. The last batch may be smaller unless
    ``drop_last``.
    """
    if n_examples < 1 or batch_size < 1 or bucket_batches < 1:
        raise DataError(
            f"batching needs n_examples >= 1, batch_size >= 1 and bucket_batches >= 1, got "
            f"{n_examples}, {batch_size} and {bucket_batches}"
        )
    if lengths is not None and len(lengths) != n_examples:
        raise DataError(f"got {len(lengths)} lengths for {n_examples} examples")
    generator = random.Random(f"lorakit-batches:{seed}:{epoch}")
    indices = generator.sample(range(n_examples), n_examples)
    if lengths is not None:
        chunk = batch_size * bucket_batches
        indices = [i for start in range(0, n_examples, chunk)
                   for i in sorted(indices[start : start + chunk], key=lengths.__getitem__)]
    batches = [indices[start : start + batch_size] for start in range(0, n_examples, batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    if lengths is not None:
        generator.shuffle(batches)
    return batches


def collate(examples: Sequence[Encoded], pad_id: int) -> dict:
    """Right-pad examples into ``{"input_ids", "attention_mask", "labels"}``, LongTensors ``(B, T)``,
    plus ``"adapter_per_row"`` (a list of names) when the examples name their adapters and
    ``"task_per_row"`` when they name their tasks.

    Padding has ``input_ids == pad_id``, ``attention_mask == 0`` and ``labels == IGNORE_INDEX``.
    """
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    width = max(len(example) for example in examples)
    input_ids = [e.input_ids + [pad_id] * (width - len(e)) for e in examples]
    mask = [[1] * len(e) + [0] * (width - len(e)) for e in examples]
    labels = [e.labels + [IGNORE_INDEX] * (width - len(e)) for e in examples]
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if any(e.adapter is not None for e in examples):
        batch["adapter_per_row"] = [e.adapter for e in examples]
    if any(e.task is not None for e in examples):
        batch["task_per_row"] = [e.task for e in examples]
    return batch


class Batches:
    """The batches of a training run over encoded examples, epoch after epoch.

    With ``pack_length``, examples are first packed into rows of at most that many tokens (in an
    order shuffled once by ``seed``); the packs are then batched like examples and collated by
    :func:`~lorakit.data.packing.collate_packed` (``position_ids`` instead of ``attention_mask``:
    run the model with ``use_cache=False``).
    """

    def __init__(
        self,
        examples: Sequence[Encoded],
        *,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        bucket: bool = False,
        bucket_batches: int = 50,
        pack_length: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if not examples:
            raise DataError("no examples to batch")
        self.items: list[Encoded] | list[Pack] = list(examples)
        if pack_length is not None:
            shuffled = random.Random(f"lorakit-packs:{seed}").sample(self.items, len(self.items))
            self.items = pack(shuffled, pack_length)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.bucket, self.bucket_batches, self.drop_last = bucket, bucket_batches, drop_last
        self.packed = pack_length is not None
        self._per_epoch = len(self.order(0))
        if self._per_epoch == 0:
            raise DataError(
                f"{len(self.items)} rows make no full batch of {batch_size} with drop_last=True"
            )

    def __len__(self) -> int:
        """The number of batches in each epoch."""
        return self._per_epoch

    def order(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` as indices into :attr:`items` (examples or packs)."""
        lengths = [len(item) for item in self.items] if self.bucket else None
        return batch_order(len(self.items), self.batch_size, self.seed, epoch, lengths=lengths,
                           bucket_batches=self.bucket_batches, drop_last=self.drop_last)

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` from batch index ``start`` on."""
        for indices in self.order(epoch)[start:]:
            yield self.collate([self.items[i] for i in indices])

    def stream(self, start: Position | None = None) -> Iterator[tuple[Position, dict[str, torch.Tensor]]]:
        """Endless ``(position, batch)`` pairs from ``start``, epoch after epoch.

        To resume after a batch, save ``position.following(len(batches))`` and pass it back.
        """
        for position, indices in self.positions(start):
            yield position, self.collate([self.items[i] for i in indices])

    def positions(self, start: Position | None = None) -> Iterator[tuple[Position, list[int]]]:
        """Endless ``(position, indices into items)`` pairs from ``start``, as :meth:`stream` but not collated (for
        a process that batches only some of them)."""
        position = start or Position()
        if position.batch >= len(self):
            raise DataError(f"{position} is past the end of an epoch of {len(self)} batches")
        while True:
            for offset, indices in enumerate(self.order(position.epoch)[position.batch:]):
                yield Position(epoch=position.epoch, batch=position.batch + offset), indices
            position = Position(epoch=position.epoch + 1, batch=0)

    def collate(self, items: Sequence[Encoded] | Sequence[Pack]) -> dict[str, torch.Tensor]:
        """Collate examples (or packs, when packing) into one batch."""
        return collate_packed(items, self.pad_id) if self.packed else collate(items, self.pad_id)
