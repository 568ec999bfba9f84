"""LoRA on bitsandbytes' quantized linears (QLoRA's set-up), on the CPU: the adapter adds ``s B A x`` beside a
``Linear4bit`` (NF4, FP4, double quantization) or ``Linear8bitLt``, trains with the base frozen, refuses to
merge (folding it into the codes would silently corrupt them), and its PEFT-format files give the same logits
as PEFT's own bitsandbytes layers on the same quantized model, both ways."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, StateError
from lorakit.core.kinds import QuantizedLinearKind
from lorakit.core.state import lora_layers
from tests.helpers import logits, perturb, tiny_llama, token_batch
from tests.quant.training import adapter_losses

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

FOUR_BIT = {"nf4": dict(quant_type="nf4"), "fp4": dict(quant_type="fp4"),
            "nf4-double": dict(quant_type="nf4", compress_statistics=True)}


def quantized(linear: nn.Linear, bits: str) -> nn.Module:
    """``linear`` as a bitsandbytes layer on the CPU: 4-bit (``FOUR_BIT[bits]``) or 8-bit (``"int8"``)."""
    bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    if bits == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        options = FOUR_BIT[bits]
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                  compute_dtype=torch.float32, **options)
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, **options)
    if bias is not None:
        layer.bias = bias
    return layer.to("cpu")  # quantizes the weight


def bnb_llama(bits: str) -> nn.Module:
    """The tiny Llama with every linear of its decoder blocks replaced by a bitsandbytes layer."""
    model = tiny_llama()
    for name, module in list(model.named_modules()):
        if ".layers." in name and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized(module, bits))
    return model.eval()  # the new layers too: bitsandbytes computes 4-bit layers differently in eval mode


@pytest.mark.parametrize("bits", [*FOUR_BIT, "int8"])
def test_an_adapter_adds_its_delta_beside_the_quantized_layer_trains_and_refuses_to_merge(bits):
    model, ids = bnb_llama(bits), token_batch()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    layers = dict(lora_layers(model))
    assert len(layers) == 14 and all(isinstance(layer.kind, QuantizedLinearKind) for layer in layers.values())
    perturb(model, "default")
    layer = layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, 64)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + adapter.scale * x @ adapter.A.T @ adapter.B.T,
                                   atol=1e-5, rtol=1e-5)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    losses = adapter_losses(model, ids, steps=5)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    model.eval()
    before = logits(model, ids)
    with pytest.raises(StateError, match="cannot be merged into quantized codes in place"):
        lorakit.merge(model)
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)


def test_peft_and_lorakit_give_the_same_logits_on_the_same_4_bit_model_with_each_others_adapters(tmp_path):
    ids = token_batch()
    ours = bnb_llama("nf4")
    lorakit.attach(ours, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    perturb(ours, "default", seed=1)
    lorakit.save_adapter(ours, tmp_path / "ours")
    flagged = bnb_llama("nf4")
    flagged.is_loaded_in_4bit = True  # as transformers flags a BitsAndBytesConfig model: PEFT's bnb layers
    theirs = peft.PeftModel.from_pretrained(flagged, tmp_path / "ours").eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)

    trained = peft.get_peft_model(bnb_llama("nf4"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                     target_modules=["k_proj", "up_proj"]))
    trained.save_pretrained(tmp_path / "theirs")
    loaded = bnb_llama("nf4")
    lorakit.load_adapter(loaded, tmp_path / "theirs", "theirs")
    torch.testing.assert_close(logits(loaded, ids), logits(trained.eval(), ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(loaded, ids), logits(bnb_llama("nf4"), ids))
