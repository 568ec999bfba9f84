"""Merging an adapter trained on a quantized base (``lorakit merge --into``): into the dequantized base (exact),
requantized (an ``nf-model`` whose codes are those of quantize(dequantize(Q) + s B A), with its error measured) and
into the original full-precision weights (both errors measured); what cannot be done is refused before anything
is written."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, FormatError, LoraConfig, StateError
from lorakit.cli.main import main
from lorakit.core.state import lora_layers
from lorakit.io.directory_kinds import directory_kind
from lorakit.jobs.merge_model import merge_into_model
from lorakit.jobs.quantized_merge import PROBE_TEXT, REPORT_FILE, compare
from lorakit.quant import NFLinear, load_quantized_base, quantize_nf
from lorakit.quant.code_packing import unpack_codes
from lorakit.quant.dequantize import dequantized_linear
from lorakit.quant.quantized_model_dir import QUANTIZED_FILE
from tests.helpers import perturb, read_tensors, rewrite_tensors
from tests.quant.test_quantized_adapter import trained_on_quantized_bases

LAYER = "model.layers.0.self_attn.q_proj"
UNADAPTED = "model.layers.0.self_attn.k_proj"


def _qlora(base_dir, out, std):
    """An adapter on q and v of the tiny base quantized to NF4 as it loads (lorakit train --quantize nf4), its
    factors drawn with standard deviation ``std``."""
    model, _ = load_quantized_base(str(base_dir), "nf4")
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    perturb(model, "default", std=std)
    return lorakit.save_adapter(model, out)


@pytest.fixture
def qlora(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return _qlora(base_dir, tmp_path / "qlora", std=0.3)


def _unmerged(adapter):
    loaded = lorakit.load(adapter)
    ids = loaded.tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded, ids, loaded.model(input_ids=ids).logits


def _update(loaded, name):
    layer = dict(lora_layers(loaded.model))[name]
    return layer.base_layer, layer.delta_weight("default")


def test_into_the_dequantized_base_equals_the_unmerged_model(qlora, tmp_path):
    report = merge_into_model(qlora, tmp_path / "m")
    loaded, ids, reference = _unmerged(qlora)
    merged = lorakit.load(tmp_path / "m")
    assert merged.kind == "model"
    assert not any(isinstance(m, NFLinear) for m in merged.model.modules())  # the unadapted k, o, mlp too
    base, delta = _update(loaded, LAYER)
    torch.testing.assert_close(merged.model.get_submodule(LAYER).weight, base.weight + delta, atol=1e-6, rtol=0)
    with torch.no_grad():
        found = merged.model(input_ids=ids).logits
    torch.testing.assert_close(found, reference, atol=1e-4, rtol=1e-4)
    assert report["into"] == "dequantized" and report["vs_unmerged"]["top1_agreement"] == 1.0
    assert report["vs_unmerged"]["max_abs_logit_difference"] < 1e-4
    assert json.loads((tmp_path / "m" / REPORT_FILE).read_text()) == report


def test_requantized_holds_the_codes_of_the_merged_weight_and_reports_their_error(qlora, tmp_path):
    report = merge_into_model(qlora, tmp_path / "q", into="requantized")
    loaded, ids, reference = _unmerged(qlora)
    assert directory_kind(tmp_path / "q").name == "nf-model"
    merged = lorakit.load(tmp_path / "q")
    base, delta = _update(loaded, LAYER)
    expected = quantize_nf(base.weight + delta, base.config)  # hand-computed: quantize(dequantize(Q) + s B A)
    layer = merged.model.get_submodule(LAYER)
    assert isinstance(layer, NFLinear) and torch.equal(layer.codes, expected.parts()["codes"].view(torch.uint8))
    assert torch.equal(layer.weight, expected.dequantize())
    unadapted = merged.model.get_submodule(UNADAPTED)  # kept bit for bit
    assert torch.equal(unadapted.codes, loaded.model.get_submodule(UNADAPTED).codes)

    error = layer.weight - (base.weight + delta)
    entry = report["requantization"]["per_layer"][LAYER]
    assert entry["weight_error"] == pytest.approx(float(error.norm() / (base.weight + delta).norm()), rel=1e-5)
    assert entry["update_error"] == pytest.approx(float(error.norm() / delta.norm()), rel=1e-5)
    before = unpack_codes(base.quantized.codes, 4, 64 * 64)
    after = unpack_codes(layer.quantized.codes, 4, 64 * 64)
    assert entry["codes_changed"] == pytest.approx(float((before != after).float().mean()))
    assert report["requantization"]["layers"] == 4
    with torch.no_grad():
        found = merged.model(input_ids=ids).logits
    measured = compare(found.float(), reference.float())
    assert report["vs_unmerged"] == pytest.approx(measured, rel=1e-5)
    assert measured["max_abs_logit_difference"] > 1e-4  # requantizing is lossy, and says so
    assert report["requantization"]["median_update_error"] < 0.5 and "warning" not in report


def test_a_requantization_that_rounds_the_update_away_says_so(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    small = _qlora(base_dir, tmp_path / "small", std=0.005)  # s B A far below half a 4-bit step
    report = merge_into_model(small, tmp_path / "q", into="requantized")
    assert report["requantization"]["median_update_error"] > 0.9
    assert report["requantization"]["median_codes_changed"] < 0.01
    assert "requantizing rounded most of the adapter away" in report["warning"]


def test_into_the_original_weights_reports_both_errors(qlora, base_dir, tmp_path):
    report = merge_into_model(qlora, tmp_path / "o", into="original")
    loaded, ids, reference = _unmerged(qlora)
    original, _ = lorakit.load_model(base_dir)
    _, delta = _update(loaded, LAYER)
    merged = lorakit.load(tmp_path / "o")
    torch.testing.assert_close(merged.model.get_submodule(LAYER).weight,
                               original.get_submodule(LAYER).weight + delta, atol=1e-6, rtol=0)
    with torch.no_grad():
        base_alone = original(input_ids=ids).logits
        quantized_alone = load_quantized_base(str(base_dir), "nf4")[0](input_ids=ids).logits
        found = merged.model(input_ids=ids).logits
    assert report["vs_unmerged"] == pytest.approx(compare(found, reference), rel=1e-5)
    assert report["base_quantization_error"] == pytest.approx(compare(quantized_alone, base_alone), rel=1e-5)
    assert report["vs_unmerged"]["max_abs_logit_difference"] > 0


def test_the_cli_prints_the_report(qlora, tmp_path, capsys):
    assert main(["merge", "--adapter", str(qlora), "--out", str(tmp_path / "q"), "--into", "requantized"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "q")
    shown = json.loads(captured.err[captured.err.index("{"):])
    assert shown["into"] == "requantized" and "per_layer" not in shown["requantization"]
    assert "top1_agreement" in shown["vs_unmerged"]


def test_into_is_refused_for_an_adapter_on_a_full_precision_base(base_dir, tmp_path):
    model, _ = lorakit.load_model(base_dir)
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
    adapter = lorakit.save_adapter(model, tmp_path / "plain")
    with pytest.raises(ConfigError, match="--into requantized is for adapters trained on a quantized base"):
        merge_into_model(adapter, tmp_path / "m", into="requantized")
    assert not (tmp_path / "m").exists()


def test_an_lq_lora_adapter_is_not_merged_into_the_original_weights(base_dir, tmp_path):
    model, quantized = trained_on_quantized_bases()
    from lorakit.quant.quantized_adapter import save_quantized_adapter
    save_quantized_adapter(model, tmp_path / "lq", quantized)
    with pytest.raises(ConfigError, match="starts at W - Q, so on the original W it would count that difference "
                                          "twice"):
        merge_into_model(tmp_path / "lq", tmp_path / "m", base=str(base_dir), into="original")
    assert not (tmp_path / "m").exists()
    report = merge_into_model(tmp_path / "lq", tmp_path / "m", base=str(base_dir), into="requantized")
    assert report["requantization"]["layers"] == 4  # its 3-bit configurations, kept per layer
    assert lorakit.load(tmp_path / "m").model.get_submodule(LAYER).config == quantized[LAYER].config


def test_a_bitsandbytes_base_is_not_requantized(base_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    model, _ = load_quantized_base(str(base_dir), "int8")
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
    adapter = lorakit.save_adapter(model, tmp_path / "int8")
    with pytest.raises(StateError, match="was a bitsandbytes Linear8bitLt: lorakit requantizes only its own"):
        merge_into_model(adapter, tmp_path / "m", into="requantized")
    assert not (tmp_path / "m").exists()
    report = merge_into_model(adapter, tmp_path / "m")
    # the weights merge exactly, but LLM.int8() also rounds the activations to int8, which a dequantized model
    # does not: the report shows that difference instead of hiding it
    assert 1e-4 < report["vs_unmerged"]["max_abs_logit_difference"] < 0.05


def test_bitsandbytes_layers_dequantize_to_the_weights_they_multiply_by():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.randn(3, 64)
    four = bnb.nn.Linear4bit(64, 16, bias=False, quant_type="nf4", device="meta")
    four.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    four = four.to("cpu").train()  # training mode: bitsandbytes' CPU reference path
    torch.testing.assert_close(dequantized_linear(four)(x), four(x), atol=1e-5, rtol=1e-5)
    eight = bnb.nn.Linear8bitLt(64, 16, bias=False, has_fp16_weights=False, device="meta")
    eight.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    eight = eight.to("cpu")
    bound = weight.abs().amax(dim=1, keepdim=True) / 127  # a step of the per-row grid (bnb rounds an fp16 copy)
    assert ((dequantized_linear(eight).weight - weight).abs() <= bound).all()


def test_an_nf_model_with_a_bad_scale_or_a_pickle_is_refused(qlora, tmp_path):
    merge_into_model(qlora, tmp_path / "q", into="requantized")
    rewrite_tensors(tmp_path / "q" / QUANTIZED_FILE, lambda t: t[f"{LAYER}.scale_offset"].fill_(float("nan")))
    with pytest.raises(FormatError, match=rf"quantized_linears\.safetensors: weight '{LAYER}'"):
        lorakit.load(tmp_path / "q")
    merge_into_model(qlora, tmp_path / "p", into="requantized")
    weights = tmp_path / "p" / "model.safetensors"
    torch.save(read_tensors(weights), weights)
    with pytest.raises(FormatError, match=r"model\.safetensors: not a readable safetensors file"):
        lorakit.load(tmp_path / "p")


def test_an_nf_model_loads_into_a_bare_model_only(qlora, base_dir, tmp_path):
    merge_into_model(qlora, tmp_path / "q", into="requantized")
    model, _ = lorakit.load_model(base_dir)
    loaded = lorakit.load(tmp_path / "q", model)
    assert isinstance(loaded.model.get_submodule(LAYER), NFLinear)
    assert isinstance(loaded.model.lm_head, nn.Linear)
    adapted, _ = lorakit.load_model(base_dir)
    lorakit.attach(adapted, LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
    with pytest.raises(ConfigError, match="load a nf-model directory into a bare model"):
        lorakit.load(tmp_path / "q", adapted)
