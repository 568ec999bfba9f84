"""Batches: shapes and padding, reproducible order, resuming mid-epoch, length bucketing."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from lorakit.data import IGNORE_INDEX, Batches, Encoded, Position, batch_order, collate
from lorakit.errors import DataError

X = IGNORE_INDEX


def encoded(length: int, start: int = 10) -> Encoded:
    ids = list(range(start, start + length))
    return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * (length // 2) + ids[length // 2 :])


def dataset(n: int = 23) -> list[Encoded]:
    return [encoded(1 + (7 * i) % 13, start=i) for i in range(n)]


def test_collate_right_pads_with_masked_labels():
    batch = collate([encoded(3), encoded(5)], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, 11, 12, X, X], [X, X, 12, 13, 14]]


@pytest.mark.parametrize("lengths", [None, list(range(100, 0, -1))])
def test_batch_order_is_a_partition_determined_by_seed_and_epoch(lengths):
    order = batch_order(100, 8, 3, 0, lengths=lengths, bucket_batches=2)
    assert sorted(i for batch in order for i in batch) == list(range(100))
    assert [len(b) for b in order].count(8) == 12 and sorted(len(b) for b in order)[0] == 4
    assert order == batch_order(100, 8, 3, 0, lengths=lengths, bucket_batches=2)
    assert order != batch_order(100, 8, 3, 1, lengths=lengths, bucket_batches=2)
    assert order != batch_order(100, 8, 4, 0, lengths=lengths, bucket_batches=2)


def test_bucketing_groups_similar_lengths():
    lengths = [(i * 37) % 200 for i in range(400)]
    spread = {
        bucket: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                    for b in batch_order(400, 8, 0, 0, lengths=lengths if bucket else None, bucket_batches=50))
        for bucket in (False, True)
    }
    assert spread[True] * 5 < spread[False]


def test_drop_last_drops_the_short_batch():
    assert [len(b) for b in batch_order(10, 4, 0, 0, drop_last=True)] == [4, 4]
    with pytest.raises(DataError, match="make no full batch"):
        Batches(dataset(3), batch_size=4, pad_id=0, drop_last=True)


def test_bad_arguments_are_data_errors():
    with pytest.raises(DataError, match="batch_size >= 1"):
        batch_order(10, 0, 0, 0)
    with pytest.raises(DataError, match="got 3 lengths for 10 examples"):
        batch_order(10, 2, 0, 0, lengths=[1, 2, 3])
    with pytest.raises(DataError, match="no examples to batch"):
        Batches([], batch_size=2, pad_id=0)
    with pytest.raises(DataError, match="epoch >= 0"):
        Position(epoch=-1)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("options", [{}, {"bucket": True, "bucket_batches": 2}, {"pack_length": 16}])
def test_resuming_from_a_position_replays_the_tail(options):
    batches = Batches(dataset(), batch_size=4, pad_id=0, seed=7, **options)
    full = [batch for _, batch in islice(batches.stream(), 3 * len(batches))]
    for k in (0, 1, len(batches) - 1, len(batches), len(batches) + 2):
        start = Position(epoch=k // len(batches), batch=k % len(batches))
        resumed = [batch for _, batch in islice(batches.stream(start), len(full) - k)]
        assert all(same(a, b) for a, b in zip(resumed, full[k:], strict=True))
    again = Batches(dataset(), batch_size=4, pad_id=0, seed=7, **options)
    assert all(same(a, b) for a, b in zip(again.epoch(1), batches.epoch(1), strict=True))


def test_stream_positions_count_batches_and_epochs():
    batches = Batches(dataset(10), batch_size=4, pad_id=0)
    positions = [position for position, _ in islice(batches.stream(), 7)]
    assert [(p.epoch, p.batch) for p in positions] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert positions[2].following(len(batches)) == Position(epoch=1, batch=0)
    assert positions[1].following(len(batches)) == Position(epoch=0, batch=2)
    with pytest.raises(DataError, match="past the end of an epoch of 3 batches"):
        next(batches.stream(Position(batch=3)))


def test_every_example_appears_once_per_epoch():
    examples = dataset()
    batches = Batches(examples, batch_size=5, pad_id=0, seed=1, bucket=True)
    seen = sorted(tuple(row[mask.bool()].tolist()) for batch in batches.epoch(2)
                  for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True))
    assert seen == sorted(tuple(e.input_ids) for e in examples)


def test_collate_carries_each_rows_task_and_adapter_when_named():
    from lorakit.data.batching import collate
    from lorakit.data.encoding import Encoded
    rows = [Encoded(input_ids=[1, 2], labels=[1, 2], task="date"), Encoded(input_ids=[3], labels=[3])]
    batch = collate(rows, pad_id=0)
    assert batch["task_per_row"] == ["date", None] and "adapter_per_row" not in batch
    plain = collate([Encoded(input_ids=[1], labels=[1])], pad_id=0)
    assert "task_per_row" not in plain and "adapter_per_row" not in plain
