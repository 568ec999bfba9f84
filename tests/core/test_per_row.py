"""Mixed batches on the stacked path: mixed ranks, Conv1D, the cache, and exact per-adapter gradients."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core import per_row
from lorakit.core.activation import routed
from lorakit.core.routing import Combination, PerRowRouting
from lorakit.errors import ConfigError
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


def test_rows_of_one_token_equal_their_single_runs_as_the_batch_changes():
    """Decode-step rows (one position each): gathered from the stack of every adapter of the layer, or (with a
    combination) from the batch's own choices; each row gets its own adapter, combination or the base, and
    a batch whose rows changed gets the new rows' factors."""
    model, ids = tiny_llama(), token_batch(rows=4, length=1)
    names = adapters(model)
    single = single_runs(model, names, ids)
    with lorakit.active(model, "n0", "n2", weights=[1.0, -0.5]):
        combined = logits(model, ids)
    combination = Combination((("n0", 1.0), ("n2", -0.5)))
    layer = model.model.layers[0].self_attn.q_proj
    # the stack's slots (its choices and the zero slot): every adapter, even for rows that use two of the three;
    # with a combination, the batch's three choices
    for rows, slots in ((["n1", None, "n2", "n0"], 4), (["n2", "n1", None, "n1"], 4),
                        ([combination, None, None, "n2"], 3)):
        mixed = logits(model, ids, adapter_per_row=rows)
        for row, choice in enumerate(rows):
            expected = combined if choice is combination else single[choice]
            torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-5)
        stack = layer.stacks[per_row.EVERY_ADAPTER_SLOT if slots == 4 else "per_row"]
        assert stack[2][0].shape[0] == slots


def counted(function, calls: dict, name: str):
    """``function``, counting its calls in ``calls[name]``."""
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("dispatch_macs", [10**12, 0], ids=["through every used adapter", "a pair per row"])
def test_packed_rows_equal_each_row_run_alone_and_reject_a_wrong_total(monkeypatch, dispatch_macs):
    """Rows packed into one sequence (one-token rows first, then longer ones, as a server packs decode tokens
    and prompt chunks) get their own adapter's, combination's or the base's output on their positions, both
    without autograd (through every used adapter at once, or one product pair per row and member: the
    dispatch cost decides) and with it (one row at a time)."""
    monkeypatch.setattr(per_row, "DISPATCH_MACS", dispatch_macs)
    calls = {name: 0 for name in ("add_dense_row_deltas", "add_segment_deltas")}
    for name in calls:
        monkeypatch.setattr(per_row, name, counted(getattr(per_row, name), calls, name))
    model = tiny_llama()
    adapters(model)
    layer = model.model.layers[0].mlp.down_proj
    choices = ("n0", None, "n2", "n1", Combination((("n0", 0.5), ("n2", -1.0))), None, "n0")
    lengths = (1, 1, 1, 4, 3, 2, 5)
    x = torch.randn(1, sum(lengths), layer.base_layer.in_features, generator=torch.Generator().manual_seed(3))
    for grad in (False, True):
        with torch.set_grad_enabled(grad), routed(model, PerRowRouting(choices, lengths)):
            packed = layer(x).detach()
        if not grad:
            assert calls == ({"add_dense_row_deltas": 1, "add_segment_deltas": 0} if dispatch_macs else
                             {"add_dense_row_deltas": 0, "add_segment_deltas": 1})
        start = 0
        for choice, length in zip(choices, lengths, strict=True):
            with torch.no_grad(), routed(model, PerRowRouting((choice,))):
                alone = layer(x[:, start:start + length])
            torch.testing.assert_close(packed[:, start:start + length], alone, atol=1e-5, rtol=1e-5)
            start += length
        assert not torch.allclose(packed[:, 0], layer.base_layer(x[:, 0]))  # n0 changes row 0
    with pytest.raises(ConfigError, match="packed rows"), routed(model, PerRowRouting(choices, lengths)):
        layer(x[:, :-1])
    with pytest.raises(ConfigError, match="one positive length per row"):
        PerRowRouting(("n0", "n1"), (1, 0))
