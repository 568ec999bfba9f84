"""NFLinear: its forward, its frozen buffers, quantize_model, and LoRA (QLoRA-style) on top of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig, StateError, TargetError
from lorakit.core.state import lora_layers
from lorakit.quant import NFConfig, NFLinear, quantize_model, quantize_nf
from tests.helpers import perturb, tiny_llama, token_batch
from tests.quant.training import adapter_losses

DOUBLE = NFConfig(scale_bits=8, scale_block_size=16)


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 20, bias=bias)


@pytest.mark.parametrize("config", [NFConfig(), DOUBLE, NFConfig(bits=3, block_size=32)])
def test_forward_is_linear_on_the_dequantized_weight(config):
    linear = _linear()
    layer = NFLinear.from_linear(linear, config)
    x = torch.randn(3, 5, 48)
    expected = F.linear(x, quantize_nf(linear.weight, config).dequantize(), linear.bias)
    assert torch.equal(layer(x), expected)
    assert (layer.in_features, layer.out_features) == (48, 20)
    assert torch.equal(layer(x.to(torch.bfloat16)),
                       F.linear(x.to(torch.bfloat16), layer.weight.to(torch.bfloat16), linear.bias.to(torch.bfloat16)))


def test_the_backward_gives_the_input_gradient_and_saves_nothing_full_size():
    """dL/dx equals plain ``F.linear``'s on the dequantized weight, and the graph keeps no tensor of the weight's
    size for the backward (QLoRA's memory saving: the weight is dequantized again there)."""
    linear = _linear()
    layer = NFLinear.from_linear(linear, DOUBLE)
    x = torch.randn(3, 5, 48, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    (out * torch.arange(20.0)).sum().backward()
    reference = x.detach().clone().requires_grad_()
    (F.linear(reference, layer.weight, linear.bias) * torch.arange(20.0)).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-6, rtol=1e-6)
    assert torch.Size([20, 48]) not in saved and sum(shape.numel() for shape in saved) < 20 * 48


def test_nothing_in_it_is_a_parameter_and_casting_the_model_keeps_the_stored_bytes():
    layer = NFLinear.from_linear(_linear(bias=False), DOUBLE)
    assert list(layer.parameters()) == [] and not isinstance(layer.weight, nn.Parameter)
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert all(torch.equal(buffer, before[name]) for name, buffer in layer.named_buffers())
    assert layer.quantized.scale_offset.dtype == torch.float32


def test_quantize_model_converts_the_decoder_linears_and_never_the_head_or_embeddings():
    model = tiny_llama()
    summary = quantize_model(model, NFConfig())
    assert summary.count == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert all(".layers." in name for name in summary.modules)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[1].mlp.down_proj, NFLinear)
    assert summary.bytes_after * 7 < summary.bytes_before  # 4.5 of 32 bits per weight
    assert summary.bytes_after == sum(m.quantized.nbytes for m in model.modules() if isinstance(m, NFLinear))


def test_quantize_model_targets_by_name_and_says_when_nothing_matched():
    model = tiny_llama()
    assert quantize_model(model, NFConfig(), targets=("q_proj",)).count == 2
    with pytest.raises(TargetError, match="matched no nn.Linear"):
        quantize_model(model, NFConfig(), targets=("lm_head",))


def _quantized_adapted_model() -> nn.Module:
    model = tiny_llama()
    quantize_model(model, NFConfig())
    torch.manual_seed(0)
    return lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))


def test_lora_on_a_quantized_model_trains_only_the_adapter():
    model = _quantized_adapted_model().train()
    frozen = {name: buffer.clone() for name, buffer in model.named_buffers() if "base_layer" in name}
    trainable = lorakit.trainable_parameters(model)
    assert trainable and all(".adapters." in name for name in trainable)
    losses = adapter_losses(model, token_batch(rows=4, length=12), steps=6)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(buffer, frozen[name]) for name, buffer in model.named_buffers() if name in frozen)


def test_the_adapter_delta_is_added_to_the_quantized_output():
    model = _quantized_adapted_model()
    perturb(model, "default")
    name, layer = next(iter(lora_layers(model)))
    adapter = layer.adapters["default"]
    x = torch.randn(2, 3, layer.base_layer.in_features)
    expected = layer.base_layer(x) + adapter.scale * F.linear(F.linear(x, adapter.A), adapter.B)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with lorakit.disabled(model):
        assert torch.equal(layer(x), layer.base_layer(x))


def test_merging_into_a_quantized_base_is_refused_and_changes_nothing():
    model = _quantized_adapted_model()
    perturb(model, "default")
    ids = token_batch()
    before = model(ids).logits
    for merge in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(StateError, match="cannot be merged into quantized codes in place"):
            merge(model)
    assert lorakit.merged_adapters(model) == {}
    assert torch.equal(model(ids).logits, before)
