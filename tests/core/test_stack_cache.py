"""The stacked factors the mixture paths reuse without autograd follow every change of the factors:
a dtype or device move, an in-place update, a replaced ``.data``; inside ``frozen_factors`` they are
reused unchecked, and checked in full again once the block is left."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.activation import routed
from lorakit.core.routing import DenseRouting, SparseRouting
from lorakit.core.stack_cache import factors_key
from lorakit.core.state import lora_layers
from tests.helpers import logits, perturb, tiny_llama, token_batch

NAMES = ("a", "b")


def with_adapters(dtype=torch.float32):
    """The tiny Llama with two perturbed adapters of different ranks, in ``dtype`` from the start."""
    model = tiny_llama().to(dtype)
    for seed, name in enumerate(NAMES):
        lorakit.attach(model, LoraConfig(rank=2 + seed, alpha=4, targets="all-linear"), name)
        perturb(model, name, seed=seed)
    return model.to(dtype)  # adapters are created in fp32 whatever the base dtype


def weights(_layer, x):
    """Per-token weights over ``NAMES`` whose larger entry alternates between the experts."""
    t = torch.arange(x.shape[:-1].numel(), dtype=x.dtype, device=x.device)
    return torch.stack([t.sin().abs(), t.cos().abs()], dim=-1).reshape(*x.shape[:-1], 2)


def top_1(layer, x):
    values, indices = weights(layer, x).topk(1, dim=-1)
    return indices, values


ROUTINGS = {
    "per-row": lambda model, ids: logits(model, ids, adapter_per_row=["a", None, "b"]),
    "dense": lambda model, ids: _routed(model, ids, DenseRouting(NAMES, weights)),
    "sparse": lambda model, ids: _routed(model, ids, SparseRouting(NAMES, top_1)),
}


def _routed(model, ids, routing):
    with routed(model, routing):
        return logits(model, ids)


def fresh_copy(model, dtype):
    """A model built in ``dtype`` from the start, holding ``model``'s weights, that never ran a forward."""
    copy = with_adapters(dtype)
    copy.load_state_dict(model.state_dict())
    return copy


def change_in_place(model, name: str, factor: str, change) -> None:
    """``change(p)`` on factor ``factor`` of adapter ``name`` in every layer, under ``no_grad`` as optimizers do."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            change(getattr(layer.adapters[name], factor))


def assert_seen(run, model, ids, before) -> None:
    """The next run differs from ``before`` and equals a fresh model with the same weights."""
    after = run(model, ids)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, run(fresh_copy(model, torch.float32), ids), atol=0, rtol=0)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_after_to_float64_a_routed_batch_equals_a_model_built_in_float64(routing):
    run, ids = ROUTINGS[routing], token_batch()
    model = with_adapters()
    run(model, ids)  # stacks the fp32 factors
    model.to(torch.float64)  # the same parameter objects, same versions, new storage
    got = run(model, ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, run(fresh_copy(model, torch.float64), ids), atol=0, rtol=0)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_an_in_place_update_after_a_forward_is_seen_by_the_next(routing):
    run, ids = ROUTINGS[routing], token_batch()
    model = with_adapters()
    before = run(model, ids)
    change_in_place(model, "a", "A", lambda p: p.add_(1))
    assert_seen(run, model, ids, before)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_replacing_a_parameters_data_is_seen_by_the_next_forward(routing):
    run, ids = ROUTINGS[routing], token_batch()
    model = with_adapters()
    before = run(model, ids)
    for _, layer in lora_layers(model):
        B = layer.adapters["b"].B
        B.data = B.data * 3  # bypasses the version counter; the storage changes
    assert_seen(run, model, ids, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("routing", ROUTINGS)
def test_after_a_device_move_a_routed_batch_equals_a_model_built_there(routing):
    run, ids = ROUTINGS[routing], token_batch()
    model = with_adapters()
    run(model, ids)  # stacks the factors on the CPU
    model.to("cuda")
    got = run(model, ids.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, run(fresh_copy(model, torch.float32).cuda(), ids.cuda()))


def test_the_key_names_dtype_and_device():
    model = with_adapters()
    adapters = [layer.adapters["a"] for _, layer in lora_layers(model)]
    key = factors_key(adapters)
    assert factors_key(adapters) == key
    with lorakit.frozen_factors():
        assert factors_key(adapters) == (key[0], None)  # which modules, not their values
    model.to(torch.float64)
    doubled = factors_key(adapters)
    assert doubled != key
    model.to("meta")
    assert factors_key(adapters) not in (key, doubled)
    assert all(p.device.type == "meta" for a in adapters for p in a.parameters())


@pytest.mark.parametrize("routing", ROUTINGS)
def test_inside_frozen_factors_a_stack_is_reused_unchecked_and_checked_again_after(routing):
    run, ids = ROUTINGS[routing], token_batch()
    model = with_adapters()
    before = run(model, ids)  # stacks built with the full key
    layer = model.model.layers[0].self_attn.q_proj
    stacks = dict(layer.stacks)
    with lorakit.frozen_factors():
        torch.testing.assert_close(run(model, ids), before, atol=0, rtol=0)
        assert all(layer.stacks[slot] is entry for slot, entry in stacks.items())  # nothing rebuilt
        change_in_place(model, "a", "A", lambda p: p.add_(1))  # breaks the promise: a stack may miss it here, ...
    assert_seen(run, model, ids, before)  # ... and sees it once the block is left


def test_a_stack_built_inside_frozen_factors_is_checked_in_full_after():
    run, ids = ROUTINGS["per-row"], token_batch()
    model = with_adapters()
    with lorakit.frozen_factors():
        before = run(model, ids)
    change_in_place(model, "b", "B", lambda p: p.mul_(2))
    assert_seen(run, model, ids, before)
