"""X-LoRA inspection: mean scalings over a dataset, per-token scalings, the PNG and JSON report."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.analysis.plots import MissingDependencyError, heatmap, layer_period, shorten_labels
from lorakit.data.batching import collate
from lorakit.data.encoding import encode, prompt_ids
from lorakit.data.example import Example
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.inspection import inspect_xlora, mean_scalings, to_json, token_scalings
from lorakit.mixtures.xlora.model import XLoraModel
from tests.helpers import char_tokenizer, perturb, tiny_llama

EXPERTS = {"maths": LoraConfig(rank=4, alpha=8, targets="all-linear"),
           "style": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
           "facts": LoraConfig(rank=3, alpha=3, targets=("down_proj",))}
SHORT = Example(prompt="12+7=", completion="19")
LONG = Example(prompt="Reverse the word 'lantern', please.", completion="nretnal")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_xlora(config: XLoraConfig = XLoraConfig(layerwise_scalings=True)) -> XLoraModel:
    """Three perturbed experts on different modules, and a classifier that prefers different ones."""
    model = tiny_llama()
    for index, (name, lora) in enumerate(EXPERTS.items()):
        lorakit.attach(model, lora, name, activate=False)
        perturb(model, name, seed=index)
    torch.manual_seed(0)
    xmodel = XLoraModel(model, list(EXPERTS), config).eval()
    with torch.no_grad():
        for parameter in xmodel.classifier.parameters():
            parameter.normal_(std=0.5)
    return xmodel


@pytest.fixture(scope="module")
def xmodel() -> XLoraModel:
    return tiny_xlora()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_mean_scalings_sum_to_one_over_experts(xmodel, tokenizer):
    summary = mean_scalings(xmodel, tokenizer, [SHORT, LONG])
    assert summary.mean.shape == (len(xmodel.layer_names), 3)
    assert summary.layer_names == xmodel.layer_names and summary.experts == list(EXPERTS)
    torch.testing.assert_close(summary.mean.sum(dim=-1), torch.ones(len(xmodel.layer_names)))
    assert summary.mean.std(dim=0).max() > 1e-3  # layerwise: the modules really differ


def test_mean_scalings_equal_a_hand_computation(xmodel, tokenizer):
    encoded = encode(SHORT, tokenizer, chat=None, max_length=256)
    with torch.no_grad():
        sigma = xmodel(torch.tensor([encoded.input_ids])).scalings  # (1, S, L, N)
    summary = mean_scalings(xmodel, tokenizer, [SHORT])
    assert summary.tokens == len(encoded)
    torch.testing.assert_close(summary.mean, sigma.mean(dim=(0, 1)), atol=1e-6, rtol=1e-5)


def test_padding_does_not_change_the_mean(xmodel, tokenizer):
    alone = mean_scalings(xmodel, tokenizer, [SHORT, LONG], batch_size=1)  # no padding at all
    padded = mean_scalings(xmodel, tokenizer, [SHORT, LONG], batch_size=2)  # SHORT right-padded
    assert alone.tokens == padded.tokens
    torch.testing.assert_close(padded.mean, alone.mean, atol=1e-5, rtol=1e-5)
    # ... and the test can see padding: an unmasked mean over the same batch differs.
    batch = collate([encode(e, tokenizer, chat=None, max_length=256) for e in (SHORT, LONG)], 0)
    with torch.no_grad():
        sigma = xmodel(batch["input_ids"], attention_mask=batch["attention_mask"]).scalings
    assert not torch.allclose(sigma.mean(dim=(0, 1)), alone.mean, atol=1e-4)


def test_token_scalings_follow_the_prompt_tokens(xmodel, tokenizer):
    result = token_scalings(xmodel, tokenizer, "Hi there")
    ids = prompt_ids(tokenizer, "Hi there", None)
    assert result.ids == ids and len(result.tokens) == len(ids)
    assert "".join(result.tokens) == tokenizer.decode(ids)  # a char tokenizer: one char (or special) each
    assert result.per_token.shape == (len(ids), 3)
    assert result.full.shape == (len(ids), len(xmodel.layer_names), 3)
    torch.testing.assert_close(result.per_token, result.full.mean(dim=1))
    torch.testing.assert_close(result.per_token.sum(dim=-1), torch.ones(len(ids)))


def test_top_k_reports_the_applied_scalings(tokenizer):
    xmodel = tiny_xlora(XLoraConfig(layerwise_scalings=True, top_k=1))
    result = token_scalings(xmodel, tokenizer, "abc")
    assert ((result.full > 0).sum(dim=-1) == 1).all()
    dense = token_scalings(xmodel, tokenizer, "abc", applied=False)
    assert (dense.full > 0).all()


def test_inspection_restores_train_mode_and_ignores_dropout(tokenizer):
    xmodel = tiny_xlora(XLoraConfig(layerwise_scalings=True, depth=2, size=16, dropout=0.5)).train()
    first = mean_scalings(xmodel, tokenizer, [SHORT])
    second = mean_scalings(xmodel, tokenizer, [SHORT])
    torch.testing.assert_close(first.mean, second.mean, atol=0, rtol=0)
    assert xmodel.training and all(m.training for m in xmodel.classifier.modules())


def test_report_writes_valid_pngs_and_round_tripping_json(xmodel, tokenizer, tmp_path):
    report = inspect_xlora(xmodel, tokenizer, [SHORT, LONG], "What is 3+4?", tmp_path / "report")
    for name in ("layers_by_experts.png", "tokens_by_experts.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    saved = json.loads((tmp_path / "report" / "scalings.json").read_text())
    assert saved == report
    assert saved["mean_scalings"]["experts"] == list(EXPERTS)
    assert len(saved["mean_scalings"]["mean"]) == len(xmodel.layer_names)
    assert len(saved["token_scalings"]["per_token"]) == len(saved["token_scalings"]["tokens"])
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.endswith(".tmp")]


def test_to_json_is_plain_json(xmodel, tokenizer):
    result = token_scalings(xmodel, tokenizer, "ok")
    with_layers = to_json(result, include_layers=True)
    assert json.loads(json.dumps(with_layers)) == with_layers
    assert len(with_layers["full"][0]) == len(xmodel.layer_names)
    with pytest.raises(TypeError, match="ScalingSummary or TokenScalings"):
        to_json({"not": "a result"})  # type: ignore[arg-type]


def test_missing_matplotlib_gives_an_actionable_error(monkeypatch, xmodel, tokenizer, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib") as caught:
        heatmap([[0.5]], ["a"], ["b"], title="t", path=tmp_path / "x.png", colorbar_label="c")
    assert isinstance(caught.value, lorakit.LorakitError) and isinstance(caught.value, ImportError)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        inspect_xlora(xmodel, tokenizer, [SHORT], "hi", tmp_path / "report")
    assert not (tmp_path / "report").exists()  # nothing written, nothing computed


def test_heatmap_labels_and_shapes(tmp_path):
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert shorten_labels(names) == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    assert shorten_labels(["'a'", "maths", "lm_head"]) == ["'a'", "maths", "lm_head"]
    clashing = ["model.layers.0.mlp.experts.0.up_proj", "model.layers.0.mlp.experts.1.up_proj"]
    assert shorten_labels(clashing) == ["0.up_proj", "1.up_proj"]
    assert layer_period(names) == 2  # rows thinned by whole layers, with a line between layers
    assert layer_period(names[:3]) is None and layer_period(["'a'", "'b'", "'c'", "'d'"]) is None
    with pytest.raises(lorakit.DataError, match="one label per row"):
        heatmap(torch.zeros(2, 3), ["a"], ["x", "y", "z"], title="t", path=tmp_path / "x.png", colorbar_label="c")
    many = heatmap(torch.rand(300, 4), [f"row {i}" for i in range(300)], list("abcd"), title="many rows",
                   path=tmp_path / "many.png", colorbar_label="value")
    assert many.read_bytes().startswith(PNG_MAGIC)
