"""Packing: greedy packs, restarting position ids, and examples that do not see each other."""

from __future__ import annotations

import pytest
import torch

from lorakit.data import IGNORE_INDEX, Encoded, collate_packed, pack
from lorakit.errors import DataError
from tests.helpers import tiny_gpt2, tiny_llama

X = IGNORE_INDEX


def example(*ids: int, supervised: int = 1) -> Encoded:
    return Encoded(input_ids=list(ids), labels=[X] * (len(ids) - supervised) + list(ids[-supervised:]))


def test_packs_are_greedy_in_order():
    examples = [example(*range(n)) for n in (3, 4, 2, 5, 1)]
    assert [[len(e) for e in p.examples] for p in pack(examples, 8)] == [[3, 4], [2, 5, 1]]
    assert [len(p) for p in pack(examples, 5)] == [3, 4, 2, 5, 1]


def test_an_example_longer_than_the_pack_is_refused():
    with pytest.raises(DataError, match="example 1 has 6 tokens; packing into rows of 5"):
        pack([example(1, 2), example(*range(6))], 5)
    with pytest.raises(DataError, match="positive number of tokens"):
        pack([example(1)], 0)


def test_collate_packed_restarts_positions_and_pads():
    packs = pack([example(5, 6, 7), example(8, 9), example(10, 11, 12, 13)], 5)
    batch = collate_packed(packs, pad_id=0)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[X, X, 7, X, 9], [X, X, X, 13, X]]
    with pytest.raises(DataError, match="empty list of packs"):
        collate_packed([], pad_id=0)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(make_model, attention):
    model = make_model()
    model.config._attn_implementation = attention
    examples = [example(5, 6, 7, 8, supervised=2), example(9, 10, 11), example(12, 13, 14, 15, 16, supervised=3)]
    batch = collate_packed(pack(examples, 8), pad_id=0)  # rows: [4 + 3 + pad 1], [5 + pad 3]
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        alone = [model(torch.tensor([e.input_ids])).logits[0] for e in examples]
    torch.testing.assert_close(packed.logits[0, :4], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logits[0, 4:7], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logits[1, :5], alone[2], atol=1e-5, rtol=1e-5)
    # The loss of the packed batch is the token-weighted mean of the examples' losses.
    predicted = [sum(label != X for label in e.labels[1:]) for e in examples]
    with torch.no_grad():
        sums = [model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * n
                for e, n in zip(examples, predicted, strict=True)]
    torch.testing.assert_close(packed.loss, sum(sums) / sum(predicted))


def test_a_supervised_first_token_is_not_predicted_from_the_previous_example():
    batch = collate_packed(pack([example(5, 6, supervised=2), example(7, 8, supervised=2)], 4), pad_id=0)
    assert batch["labels"].tolist() == [[X, 6, X, 8]]
