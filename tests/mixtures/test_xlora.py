"""X-LoRA on the core layer: the two passes, routing, caches, training, saving."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.eval.generate import generate
from lorakit.methods.component import WritesResult
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.model import XLoraModel
from lorakit.mixtures.xlora.storage import load_xlora, save_xlora
from lorakit.train import train
from tests.helpers import char_tokenizer, copy_examples, logits, perturb, run_interrupted, tiny_llama, token_batch

EXPERTS = {"maths": LoraConfig(rank=4, alpha=8, targets="all-linear"),
           "style": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
           "facts": LoraConfig(rank=3, alpha=3, targets=("down_proj",))}


def with_experts(seed: int = 0):
    model = tiny_llama()
    for index, (name, config) in enumerate(EXPERTS.items()):
        lorakit.attach(model, config, name, activate=False)
        perturb(model, name, seed=seed + index)
    return model


def xlora(config: XLoraConfig = XLoraConfig(layerwise_scalings=True), seed: int = 0) -> XLoraModel:
    model = with_experts()
    torch.manual_seed(seed)
    xmodel = XLoraModel(model, list(EXPERTS), config).eval()
    with torch.no_grad():  # a classifier that actually prefers different experts per token
        for parameter in xmodel.classifier.parameters():
            parameter.normal_(std=0.5)
    return xmodel


def test_scaling_pass_at_zero_is_the_base_model():
    xmodel = xlora()
    ids = token_batch()
    hidden, _ = xmodel.scaling_pass({"input_ids": ids})
    base = tiny_llama()
    with torch.no_grad():
        expected = base(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=1e-6)


def test_scalings_are_per_token_per_layer_and_sum_to_one():
    xmodel = xlora()
    out = xmodel(token_batch())
    assert out.scalings.shape == (3, 9, xmodel.n_layers, 3)
    assert xmodel.n_layers == 14  # all-linear in 2 layers; the other experts' modules are among them
    torch.testing.assert_close(out.scalings.sum(-1), torch.ones(3, 9, 14), atol=1e-6, rtol=0)
    assert out.scalings.std() > 0.01


def test_one_hot_scalings_equal_each_single_expert():
    xmodel = xlora()
    ids = token_batch()
    for column, name in enumerate(EXPERTS):
        one_hot = torch.zeros(3, 9, xmodel.n_layers, 3)
        one_hot[..., column] = 1.0
        with torch.no_grad():
            mixed = xmodel(ids, scalings=one_hot).logits
        with lorakit.active(xmodel.base, name):
            torch.testing.assert_close(mixed, logits(xmodel.base, ids), atol=1e-5, rtol=1e-5)


def test_top_k_computes_k_experts_and_equals_dense_with_the_rest_masked():
    dense = xlora()
    sparse = xlora(XLoraConfig(layerwise_scalings=True, top_k=2))
    ids = token_batch()
    with torch.no_grad():
        scalings = dense(ids).scalings
        kept = scalings.topk(2, dim=-1)
        masked = torch.zeros_like(scalings).scatter(-1, kept.indices, kept.values)
        torch.testing.assert_close(sparse(ids).logits, dense(ids, scalings=masked).logits, atol=1e-5, rtol=1e-5)
    assert int((masked > 0).sum(-1).max()) == 2


def test_top_k_equal_to_n_is_dense():
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(xlora(XLoraConfig(top_k=3))(ids).logits, xlora(XLoraConfig())(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_softmax_top_k_renormalises_per_token():
    from lorakit.mixtures.xlora.classifier import keep_top_k
    scalings = torch.tensor([[[[0.5, 0.3, 0.2]]], [[[0.1, 0.1, 0.8]]]])
    _, values = keep_top_k(scalings, 2, softmax=True)
    torch.testing.assert_close(values.sum(-1), torch.ones(2, 1, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(values[0, 0, 0], torch.softmax(torch.tensor([0.5, 0.3]), 0))


def test_cached_generation_equals_uncached():
    xmodel = xlora()
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    cached = xmodel.generate(ids, mask, max_new_tokens=8, use_cache=True)
    uncached = xmodel.generate(ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    # and the logits of a cached step equal a full recomputation
    with torch.no_grad():
        first = xmodel(ids, attention_mask=mask, use_cache=True)
        step = xmodel(cached[:, 9:10], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], -1),
                      past_key_values=first.past_key_values, use_cache=True)
        full = xmodel(cached[:, :10], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], -1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_reusing_prompt_scalings_runs_one_pass_per_new_token():
    xmodel = xlora()
    calls = {"n": 0}
    original = xmodel.scaling_pass

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    xmodel.scaling_pass = counting
    xmodel.generate(token_batch(), max_new_tokens=5, reuse_prompt_scalings=True)
    assert calls["n"] == 1
    xmodel.generate(token_batch(), max_new_tokens=5)
    assert calls["n"] == 1 + 5


def test_only_the_classifier_trains_and_experts_stay_frozen(tmp_path):
    xmodel = xlora()
    tokenizer = char_tokenizer()
    experts_before = {n: p.detach().clone() for n, p in xmodel.base.named_parameters()}
    classifier_before = {n: p.detach().clone() for n, p in xmodel.classifier.named_parameters()}
    train(xmodel, tokenizer, copy_examples(8), TrainConfig(steps=3, batch_size=4, lr=1e-2), progress=False)
    generate(xmodel, tokenizer, ["Copy: ab"], max_new_tokens=3)
    for name, parameter in xmodel.base.named_parameters():
        assert torch.equal(parameter, experts_before[name]) and not parameter.requires_grad, name
    assert all(not torch.equal(p, classifier_before[n]) and p.requires_grad
               for n, p in xmodel.classifier.named_parameters())


def test_trainable_experts_train_with_the_classifier():
    xmodel = xlora(XLoraConfig(trainable_experts=True))
    before = {n: p.detach().clone() for n, p in xmodel.base.named_parameters() if ".adapters." in n}
    train(xmodel, char_tokenizer(), copy_examples(8), TrainConfig(steps=2, batch_size=4, lr=1e-2), progress=False)
    changed = [n for n, p in xmodel.base.named_parameters() if ".adapters." in n and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


@pytest.mark.parametrize("bundle", [False, True])
def test_save_and_load_round_trip(tmp_path, bundle):
    xmodel = xlora()
    paths = {}
    for name in EXPERTS:
        paths[name] = lorakit.save_adapter(xmodel.base, tmp_path / "experts" / name, name)
    save_xlora(xmodel, tmp_path / "x", paths, bundle=bundle)
    saved = json.loads((tmp_path / "x" / "xlora_config.json").read_text())
    assert [e["name"] for e in saved["experts"]] == list(EXPERTS)  # the order of the scalings' expert axis
    # relative: inside the run directory when bundled, beside it otherwise
    assert saved["experts"][0]["path"] == ("experts/maths" if bundle else "../experts/maths")
    loaded = load_xlora(tiny_llama(), tmp_path / "x").eval()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, xmodel(ids).logits, atol=1e-6, rtol=1e-6)


def test_loading_refuses_missing_experts_and_other_bases(tmp_path):
    xmodel = xlora()
    paths = {n: lorakit.save_adapter(xmodel.base, tmp_path / "e" / n, n) for n in EXPERTS}
    save_xlora(xmodel, tmp_path / "x", paths)
    other_base = tiny_llama()
    other_base.config._name_or_path = "org/other"
    (tmp_path / "e" / "style" / "adapter_config.json").write_text(
        (tmp_path / "e" / "style" / "adapter_config.json").read_text().replace('"base_model_name_or_path": null',
                                                                               '"base_model_name_or_path": "org/tiny"'))
    with pytest.raises(lorakit.FormatError, match="trained on 'org/tiny'"):
        load_xlora(other_base, tmp_path / "x")
    import shutil
    shutil.rmtree(tmp_path / "e" / "facts")
    with pytest.raises(lorakit.FormatError, match="expert 'facts'.*no such adapter directory"):
        load_xlora(tiny_llama(), tmp_path / "x")


def test_unknown_experts_are_refused():
    with pytest.raises(lorakit.AdapterError, match="'nope'"):
        XLoraModel(with_experts(), ["maths", "nope"])


def test_scalings_logging_collects_every_forward():
    xmodel = xlora()
    xmodel.logged_scalings = []
    xmodel.generate(token_batch(), max_new_tokens=3)
    shapes = [tuple(s.shape) for s in xmodel.logged_scalings]
    assert shapes == [(3, 9, 14, 3), (3, 1, 14, 3), (3, 1, 14, 3)]  # the prompt, then one token per step


NO_SAVE = WritesResult(lambda directory: None)  # the classifier is compared in memory


def test_an_interrupted_xlora_run_resumes_to_the_same_classifier(tmp_path, monkeypatch):
    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, seed=1)
    straight = xlora()
    train(straight, char_tokenizer(), copy_examples(8), config, out_dir=tmp_path / "a", progress=False,
          components=[NO_SAVE])
    run_interrupted(monkeypatch, 3, lambda: train(xlora(), char_tokenizer(), copy_examples(8), config,
                                                  out_dir=tmp_path / "b", progress=False, components=[NO_SAVE]))
    resumed = xlora(seed=5)
    train(resumed, char_tokenizer(), copy_examples(8), config, out_dir=tmp_path / "b", resume=tmp_path / "b",
          progress=False, components=[NO_SAVE])
    for (name, a), (_, b) in zip(straight.classifier.named_parameters(), resumed.classifier.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_an_x_lora_model_on_an_eval_mode_base_starts_in_eval_mode():
    xmodel = XLoraModel(with_experts().eval(), list(EXPERTS), XLoraConfig(depth=2, dropout=0.5))
    assert not xmodel.training and not xmodel.classifier.training
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(xmodel(ids).scalings, xmodel(ids).scalings)
