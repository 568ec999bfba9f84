"""Mixed batches on the stacked path: mixed ranks, Conv1D, the cache, and exact per-adapter gradients."""

from __future__ import annotations

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.routing import Combination
from tests.helpers import logits, perturb, tiny_gpt2, tiny_llama, token_batch


def adapters(model, ranks=(2, 4, 3), targets=("q_proj", "v_proj", "down_proj")):
    names = [f"n{i}" for i in range(len(ranks))]
    for i, (name, rank) in enumerate(zip(names, ranks, strict=True)):
        lorakit.attach(model, LoraConfig(rank=rank, alpha=2 * rank + i, use_rslora=i == 1, targets=targets), name)
        perturb(model, name, seed=i)
    return names


def single_runs(model, names, ids):
    out = {}
    for name in names:
        with lorakit.active(model, name):
            out[name] = logits(model, ids)
    with lorakit.disabled(model):
        out[None] = logits(model, ids)
    return out


def assert_rows_equal_single_runs(model, names, rows, ids):
    single = single_runs(model, names, ids)
    mixed = logits(model, ids, adapter_per_row=rows)
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], single[name][row], atol=1e-5, rtol=1e-5)


def test_rows_with_adapters_of_different_ranks_equal_their_single_runs():
    model, ids = tiny_llama(), token_batch(rows=5)
    assert_rows_equal_single_runs(model, adapters(model), ["n2", "n0", None, "n1", "n0"], ids)


def test_gpt2_conv1d_rows_equal_their_single_runs():
    model, ids = tiny_gpt2(), token_batch(rows=3)
    names = adapters(model, ranks=(2, 3), targets=("c_attn", "c_fc"))
    assert_rows_equal_single_runs(model, names, ["n1", "n0", "n1"], ids)


def test_the_cached_stack_follows_changed_weights():
    model, ids = tiny_llama(), token_batch(rows=2)
    names = adapters(model, ranks=(2, 2))
    before = logits(model, ids, adapter_per_row=names)
    perturb(model, "n1", seed=7)  # in-place: the parameters' versions move
    after = logits(model, ids, adapter_per_row=names)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    assert not torch.allclose(after[1], before[1])
    with lorakit.active(model, "n1"):
        torch.testing.assert_close(after[1], logits(model, ids)[1], atol=1e-5, rtol=1e-5)


def loss_of_rows(model, ids, rows, **kwargs):
    return model(ids[rows], **kwargs).logits.square().mean(dim=(1, 2)).sum()


def test_adapters_trained_in_one_batch_get_the_gradients_of_training_alone():
    model, ids = tiny_llama(), token_batch(rows=4)
    adapters(model, ranks=(2, 4))  # both trainable (attach's default); the base is frozen
    rows = ["n0", "n1", "n1", "n0"]
    loss_of_rows(model, ids, [0, 1, 2, 3], adapter_per_row=rows).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name, own_rows in (("n0", [0, 3]), ("n1", [1, 2])):
        with lorakit.active(model, name):
            loss_of_rows(model, ids, own_rows).backward()
    alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert joint.keys() == alone.keys() and any(".n0." in k for k in joint) and any(".n1." in k for k in joint)
    for key in joint:
        torch.testing.assert_close(joint[key], alone[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_combination_row_equals_the_weighted_active_set_and_leaves_other_rows_alone():
    model, ids = tiny_llama(), token_batch(rows=3)
    names = adapters(model)
    weights = {"n0": 1.0, "n2": -0.5}
    with lorakit.active(model, *weights, weights=list(weights.values())):
        combined = logits(model, ids)
    single = single_runs(model, names, ids)
    mixed = logits(model, ids, adapter_per_row=[Combination(tuple(weights.items())), "n1", None])
    torch.testing.assert_close(mixed[0], combined[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], single["n1"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], single[None][2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], single["n0"][0])
