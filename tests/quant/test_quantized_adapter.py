"""The ``quantized-adapter`` directory: an adapter saved with the quantized bases it was trained on loads back onto
a fresh full-precision model as that model (same logits), and a missing or mismatched quantized base is refused
before the model changes."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import FormatError, LoraConfig
from lorakit.core.state import lora_layers
from lorakit.io.directory_kinds import directory_kind
from lorakit.quant import NFConfig, NFLinear, quantize_nf
from lorakit.quant.quantized_adapter import QUANTIZED_BASES_FILE, quantize_bases, save_quantized_adapter
from tests.helpers import logits, perturb, tiny_llama, token_batch

CONFIG = NFConfig(bits=3, block_size=32)


def trained_on_quantized_bases():
    """The tiny Llama with an adapter on q and v whose bases were then quantized, and those quantized weights."""
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    perturb(model, "default")
    quantized = {name: quantize_nf(layer.base_layer.weight, CONFIG) for name, layer in lora_layers(model)}
    quantize_bases(model, quantized)
    return model, quantized


def test_it_loads_back_as_the_model_it_was_saved_from(tmp_path):
    model, quantized = trained_on_quantized_bases()
    save_quantized_adapter(model, tmp_path / "run", quantized)
    assert json.loads((tmp_path / "run" / "lorakit.json").read_text())["kind"] == "quantized-adapter"
    loaded = lorakit.load(tmp_path / "run", tiny_llama())
    assert loaded.kind == "quantized-adapter" and loaded.adapters == ("default",)
    layers = dict(lora_layers(loaded.model))
    assert len(layers) == 4 and all(isinstance(layer.base_layer, NFLinear) for layer in layers.values())
    ids = token_batch()
    torch.testing.assert_close(logits(loaded.model, ids), logits(model, ids), atol=0, rtol=0)
    described = directory_kind(tmp_path / "run").describe(tmp_path / "run")
    assert set(described["quantized_bases"]) == set(quantized) and described["rank"] == 4


def test_a_missing_or_mismatched_quantized_base_is_refused_before_the_model_changes(tmp_path):
    model, quantized = trained_on_quantized_bases()
    save_quantized_adapter(model, tmp_path / "run", quantized)
    (tmp_path / "run" / QUANTIZED_BASES_FILE).unlink()
    fresh = tiny_llama()
    with pytest.raises(FormatError, match=QUANTIZED_BASES_FILE):
        lorakit.load(tmp_path / "run", fresh)
    assert not list(lora_layers(fresh))
    name = next(iter(quantized))
    with pytest.raises(FormatError, match="belongs to another model"):
        quantize_bases(model, {name: quantize_nf(torch.randn(8, 64), CONFIG)})


def _saved_on(base_dir, path):
    """An adapter trained on quantized bases of the model saved in ``base_dir``, saved to ``path``: that model."""
    model, _ = lorakit.load_model(base_dir)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    perturb(model, "default")
    quantized = {name: quantize_nf(layer.base_layer.weight, CONFIG) for name, layer in lora_layers(model)}
    quantize_bases(model, quantized)
    save_quantized_adapter(model, path, quantized)
    return model, quantized


def test_with_no_model_the_base_is_built_with_its_quantized_linears_in_place(base_dir, tmp_path, monkeypatch):
    model, _ = _saved_on(base_dir, tmp_path / "run")

    def no_full_precision_model(*args, **kwargs):
        raise AssertionError("the whole full-precision base was loaded")

    monkeypatch.setattr("lorakit.io.recorded_base.load_model", no_full_precision_model)
    loaded = lorakit.load(tmp_path / "run")
    assert loaded.kind == "quantized-adapter" and loaded.tokenizer is not None and not loaded.model.training
    layers = dict(lora_layers(loaded.model))
    assert len(layers) == 4 and all(isinstance(layer.base_layer, NFLinear) for layer in layers.values())
    assert not any(p.device.type == "meta" for p in loaded.model.parameters())
    ids = token_batch()
    torch.testing.assert_close(logits(loaded.model, ids), logits(model, ids), atol=0, rtol=0)


def test_with_no_model_a_quantized_base_of_another_shape_is_refused(base_dir, tmp_path):
    model, quantized = _saved_on(base_dir, tmp_path / "run")
    name = next(iter(quantized))
    save_quantized_adapter(model, tmp_path / "run", {**quantized, name: quantize_nf(torch.randn(8, 64), CONFIG)})
    with pytest.raises(FormatError, match=f"{name}.*belongs to another model"):
        lorakit.load(tmp_path / "run")
