"""L4QLinear and UniformQuantizedLinear: attaching L4Q to a LoRA model, finalizing to integer codes, the
layer kind of the result."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import AdapterError, LoraConfig, StateError, TargetError
from lorakit.core.state import lora_layers
from lorakit.quant.l4q import (
    L4QConfig,
    L4QLinear,
    UniformQuantizedLinear,
    attach_l4q,
    finalize_l4q,
    l4q_layers,
)
from tests.helpers import logits, perturb, tiny_gpt2, tiny_llama, token_batch

ALL_LINEAR = LoraConfig(rank=4, alpha=8, targets="all-linear")


def l4q_llama(bits: int = 4, group_size: int = 48) -> torch.nn.Module:
    """The tiny Llama (widths 64 and 128: group 48 leaves a shorter last group) with a perturbed adapter in L4Q."""
    model = tiny_llama()
    lorakit.attach(model, ALL_LINEAR)
    perturb(model, "default", std=0.05)
    attach_l4q(model, bits=bits, group_size=group_size)
    return model


def test_every_adapted_linear_becomes_an_l4q_layer_sharing_the_adapter():
    model = tiny_llama()
    lorakit.attach(model, ALL_LINEAR)
    adapters = {name: layer.adapters["default"] for name, layer in lora_layers(model)}
    converted = attach_l4q(model, bits=3, group_size=32)
    assert sorted(converted) == sorted(adapters) and not list(lora_layers(model))
    layers = l4q_layers(model)
    for name, layer in layers.items():
        assert layer.adapters["default"] is adapters[name]  # the same A and B Parameters
        assert layer.step.shape == layer.offset.shape == (layer.out_features, -(-layer.in_features // 32))
        assert layer.step.requires_grad and not layer.base_layer.weight.requires_grad
    trainable = set(lorakit.trainable_parameters(model))
    assert "model.layers.0.self_attn.q_proj.step" in trainable and "model.layers.1.mlp.down_proj.offset" in trainable
    assert "model.layers.0.self_attn.q_proj.adapters.default.A" in trainable
    assert attach_l4q(model) == [] and l4q_layers(model).keys() == layers.keys()  # idempotent (a resumed run)
    assert all(layers[n] is m for n, m in l4q_layers(model).items())


@pytest.mark.parametrize(("bits", "group_size"), [(4, 48), (2, 64), (8, 128), (3, 7)])
def test_finalize_computes_the_l4q_forward(bits, group_size):
    model = l4q_llama(bits, group_size)
    ids = token_batch()
    before = logits(model, ids)
    finalize_l4q(model)
    assert not l4q_layers(model) and getattr(model, "lorakit_state", None) is None  # no adapter left
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, UniformQuantizedLinear)}
    assert len(quantized) == 14
    for layer in quantized.values():
        assert layer.codes.dtype == torch.uint8 and int(layer.codes.max()) <= 2 ** bits - 1
        assert not any(True for _ in layer.parameters())
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)


def test_the_finalized_codes_are_those_of_the_trained_weight():
    model = l4q_llama(bits=4, group_size=48)
    layer = l4q_layers(model)["model.layers.0.mlp.up_proj"]
    final = layer.finalize()
    assert torch.equal(final.weight, layer.quantized_weight())
    x = torch.randn(2, 3, layer.in_features)
    assert torch.equal(final(x), layer(x).detach())
    with torch.no_grad():
        A, B, scale = layer.adapters["default"].factors()
        merged = layer.base_layer.weight + scale * B @ A  # (128, 64)
        steps = layer.step.repeat_interleave(48, dim=1)[:, :64]
        offsets = layer.offset.repeat_interleave(48, dim=1)[:, :64]
        codes = (merged / steps - offsets).round().clamp(0, 15)
    assert torch.equal(final.codes, codes.to(torch.uint8))
    torch.testing.assert_close(final.weight, steps * (codes + offsets))


def test_a_layer_that_is_not_an_nn_linear_is_refused_by_name():
    model = tiny_gpt2()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("c_attn",)))
    with pytest.raises(TargetError, match=r"module 'transformer\.h\.0\.attn\.c_attn' adapts a Conv1D"):
        attach_l4q(model)
    assert len(list(lora_layers(model))) == 2 and not l4q_layers(model)  # nothing changed


def test_a_layer_with_two_adapters_is_refused():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj",)), "other")
    with pytest.raises(StateError, match="exactly one unmerged adapter"):
        attach_l4q(model)
    with pytest.raises(AdapterError, match="unknown adapter 'missing'"):
        attach_l4q(model, "missing")


def test_finalize_refuses_a_diverged_step():
    model = l4q_llama()
    layer = l4q_layers(model)["model.layers.1.self_attn.o_proj"]
    with torch.no_grad():
        layer.step[0, 0] = float("nan")
    with pytest.raises(StateError, match="not finite"):
        finalize_l4q(model)
    assert len(l4q_layers(model)) == 14  # checked before any layer changed


def test_lora_adapts_the_finalized_model_again():
    model = l4q_llama()
    finalize_l4q(model)
    ids = token_batch()
    before = logits(model, ids)
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    assert torch.equal(logits(model, ids), before)  # B = 0: the quantized model unchanged
    perturb(model, "default")
    assert not torch.allclose(logits(model, ids), before)
    with pytest.raises(StateError, match="quantized UniformQuantizedLinear"):
        lorakit.merge(model, ["default"])


def test_the_uniform_layer_refuses_bad_parts():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    step, offset = torch.ones(4, 2), torch.zeros(4, 2)
    config = L4QConfig(bits=2, group_size=4)
    with pytest.raises(lorakit.FormatError, match=r"tensor 'codes': holds code 4, above 3"):
        UniformQuantizedLinear(codes.index_fill(1, torch.tensor([3]), 4), step, offset, None, config)
    with pytest.raises(lorakit.FormatError, match=r"tensor 'step': holds non-finite"):
        UniformQuantizedLinear(codes, step.index_fill(0, torch.tensor([1]), float("inf")), offset, None, config)
    with pytest.raises(lorakit.FormatError, match=r"tensor 'offset': is torch.float32 of shape \[4, 3\]"):
        UniformQuantizedLinear(codes, step, torch.zeros(4, 3), None, config)
    assert isinstance(L4QLinear, type)


def test_a_biased_linear_finalizes_and_stores_its_bias(tmp_path):
    from lorakit.io.files import write_atomically
    from lorakit.quant.l4q import load_quantized_linears, quantized_linears_writer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(20, 6)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = Net()
    lorakit.attach(net, LoraConfig(rank=2, alpha=4, targets=("proj",)))
    perturb(net, "default")
    attach_l4q(net, bits=3, group_size=8)
    x = torch.randn(4, 20)
    with torch.no_grad():
        trained = net(x)
    finalize_l4q(net)
    assert torch.equal(net(x), trained)
    write_atomically(tmp_path / "q.safetensors", quantized_linears_writer({"proj": net.proj}))
    loaded = load_quantized_linears(tmp_path / "q.safetensors")["proj"]
    assert torch.equal(loaded.bias, net.proj.bias) and torch.equal(loaded(x), trained)
