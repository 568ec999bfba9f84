"""Dense per-token and sparse top-k routing over named experts (the routing of X-LoRA and MeteoRA)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.activation import routed
from lorakit.core.routing import DenseRouting, SparseRouting
from tests.helpers import TinyConvNet, logits, perturb, tiny_llama, token_batch

NAMES = ("a", "b", "c")


@pytest.fixture
def model():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), "a")
    lorakit.attach(model, LoraConfig(rank=2, alpha=2, targets=("q_proj", "v_proj", "embed_tokens")), "b")
    lorakit.attach(model, LoraConfig(rank=3, alpha=6, targets=("down_proj",)), "c")
    for seed, name in enumerate(NAMES):
        perturb(model, name, seed=seed)
    return model


def constant(values):
    def weights(layer, x):
        shape = x.shape if not x.is_floating_point() else x.shape[:-1]
        return torch.tensor(values).expand(*shape, len(values))
    return weights


def test_one_hot_dense_routing_equals_the_single_adapter(model):
    ids = token_batch()
    for column, name in enumerate(NAMES):
        with lorakit.active(model, name):
            single = logits(model, ids)
        one_hot = [1.0 if i == column else 0.0 for i in range(3)]
        with routed(model, DenseRouting(NAMES, constant(one_hot))):
            torch.testing.assert_close(logits(model, ids), single, atol=1e-5, rtol=1e-5)


def test_constant_dense_weights_equal_the_static_weighted_sum(model):
    ids = token_batch()
    with lorakit.active(model, *NAMES, weights=[0.5, -1.0, 2.0]):
        static = logits(model, ids)
    with routed(model, DenseRouting(NAMES, constant([0.25, -0.5, 1.0]), scale=2.0)):
        torch.testing.assert_close(logits(model, ids), static, atol=1e-5, rtol=1e-5)


def test_per_token_weights_follow_the_formula_on_one_layer(model):
    layer = model.model.layers[0].self_attn.q_proj  # holds a and b, not c
    x = torch.randn(2, 5, 64)
    w = torch.rand(2, 5, 3)
    with torch.no_grad(), routed(model, DenseRouting(NAMES, lambda _layer, _x: w, scale=0.5)):
        got = layer(x)
    expected = layer.base_layer(x)
    for column, name in enumerate(("a", "b")):
        adapter = layer.adapters[name]
        expected = expected + 0.5 * w[..., column:column + 1] * adapter.scale * (x @ adapter.A.T @ adapter.B.T)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def random_weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    cache = {}

    def weights(layer, x):
        shape = x.shape if not x.is_floating_point() else x.shape[:-1]
        if id(layer) not in cache:
            cache[id(layer)] = torch.rand(*shape, 3, generator=generator)
        return cache[id(layer)]
    return weights


def top_k(weights, k):
    def select(layer, x):
        values, indices = weights(layer, x).topk(k, dim=-1)
        return indices, values
    return select


def masked(weights, k):
    def dense(layer, x):
        full = weights(layer, x)
        values, indices = full.topk(k, dim=-1)
        return torch.zeros_like(full).scatter(-1, indices, values)
    return dense


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_top_k_equals_dense_with_the_rest_masked(model, k):
    ids = token_batch()
    weights = random_weights()
    with routed(model, DenseRouting(NAMES, masked(weights, k))):
        dense = logits(model, ids)
    with routed(model, SparseRouting(NAMES, top_k(weights, k))):
        sparse = logits(model, ids)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    if k == 3:
        with routed(model, DenseRouting(NAMES, weights)):
            torch.testing.assert_close(sparse, logits(model, ids), atol=1e-5, rtol=1e-5)


def test_routing_is_unchanged_by_merging(model):
    ids = token_batch()
    weights = random_weights()
    with routed(model, DenseRouting(NAMES, weights)):
        unmerged = logits(model, ids)
    lorakit.set_active(model, "a", "c", weights=[1.0, 0.5])
    lorakit.merge(model)
    with routed(model, DenseRouting(NAMES, weights)):
        torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merging_is_refused_while_routing_is_in_force(model):
    with routed(model, DenseRouting(NAMES, constant([1.0, 0.0, 0.0]))):
        with pytest.raises(lorakit.StateError, match="routing is in force"):
            lorakit.merge(model, ["a"])


def test_unknown_expert_names_are_refused(model):
    with pytest.raises(lorakit.AdapterError, match="'zzz'"):
        with routed(model, DenseRouting(("a", "zzz"), constant([1.0, 1.0]))):
            pass


def test_gradients_of_the_weights_match_finite_differences(model):
    layer = model.model.layers[0].mlp.down_proj.double()  # holds a and c
    x = torch.randn(1, 3, 128, dtype=torch.float64)
    def output(w):
        with routed(model, DenseRouting(NAMES, lambda _layer, _x: w)):
            return layer(x)
    w = torch.rand(1, 3, 3, dtype=torch.float64, requires_grad=True)
    for adapter in layer.adapters.values():
        adapter.double()
    assert torch.autograd.gradcheck(output, (w,), eps=1e-6, atol=1e-5)


def test_conv2d_layers_refuse_per_token_routing():
    net = TinyConvNet()
    lorakit.attach(net, LoraConfig(rank=2, targets=("conv1",)), "a")
    with routed(net, DenseRouting(("a",), constant([1.0]))), pytest.raises(lorakit.StateError, match="Conv2d"):
        net(torch.randn(1, 3, 6, 6))
