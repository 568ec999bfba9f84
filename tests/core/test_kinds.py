"""Embedding, GPT-2 Conv1D and Conv2d layers: identity at init, hand-computed deltas, merging."""

from __future__ import annotations

import torch

import lorakit
from lorakit import LoraConfig
from tests.helpers import TinyConvNet, logits, perturb, tiny_gpt2, tiny_llama, token_batch


def test_embedding_delta_is_column_of_a_times_b():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=3, alpha=6, targets=("embed_tokens",)))
    layer = model.model.embed_tokens
    adapter = layer.adapters["default"]
    assert torch.count_nonzero(adapter.A) == 0 and torch.count_nonzero(adapter.B) > 0  # PEFT's init
    perturb(model, "default")
    ids = torch.tensor([[5, 17, 5]])
    with torch.no_grad():
        expected = layer.base_layer(ids) + 2.0 * adapter.A[:, ids].permute(1, 2, 0) @ adapter.B.T
        torch.testing.assert_close(layer(ids), expected, atol=1e-6, rtol=1e-6)


def test_conv1d_matches_the_linear_formula():
    model = tiny_gpt2()
    lorakit.attach(model, LoraConfig(rank=4, alpha=4, targets=("c_attn",)))
    perturb(model, "default")
    layer = model.transformer.h[0].attn.c_attn
    adapter = layer.adapters["default"]
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = x @ layer.base_layer.weight + layer.base_layer.bias + x @ adapter.A.T @ adapter.B.T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gpt2_merge_equivalence():
    model = tiny_gpt2()
    ids = token_batch()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    perturb(model, "default")
    unmerged = logits(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    plain = lorakit.merge_and_unload(model)
    torch.testing.assert_close(logits(plain, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_conv2d_identity_delta_and_merge():
    model = TinyConvNet().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        base = model(x)
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("conv1", "conv2")))
    with torch.no_grad():
        assert torch.equal(model(x), base)
    perturb(model, "default")
    layer = model.conv1
    adapter = layer.adapters["default"]
    with torch.no_grad():
        code = torch.nn.functional.conv2d(x, adapter.A, padding=1)
        expected = layer.base_layer(x) + 2.0 * torch.nn.functional.conv2d(code, adapter.B)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        unmerged = model(x)
        lorakit.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_applies_to_the_adapter_input_in_training_only():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, dropout=0.5, targets=("q_proj",)))
    perturb(model, "default")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(0)
        first = layer(x)
        with lorakit.disabled(model):
            base = layer(x)
        assert not torch.allclose(first, layer(x))  # a fresh mask each call
        assert torch.equal(layer.base_layer(x), base)  # the base path never sees dropout


def test_adapters_take_the_training_mode_of_the_model_they_join():
    model = tiny_llama().eval()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, dropout=0.5, targets="all-linear"), "a")
    perturb(model, "a")
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(logits(model, ids), logits(model, ids))  # no dropout in an eval-mode model
    lorakit.attach(model.train(), LoraConfig(rank=2, dropout=0.5, targets=("q_proj",)), "b")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.adapters["b"].training and layer.adapters["a"].training
