"""Saving and loading lorakit adapters: round trips into a fresh base, names, flags."""

from __future__ import annotations

import json

import torch

import lorakit
from lorakit import LoraConfig
from tests.helpers import logits, perturb, tiny_llama, token_batch


def test_round_trip_into_a_fresh_base(tmp_path):
    ids = token_batch()
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear", use_rslora=True,
                                     rank_pattern={"down_proj": 2}), "mine")
    perturb(model, "mine")
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    torch.manual_seed(123)
    assert lorakit.load_adapter(fresh, tmp_path, "mine") == "mine"
    ours = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
    theirs = {k: v for k, v in fresh.state_dict().items() if ".adapters." in k}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-6, rtol=1e-6)


def test_round_trip_after_training_steps(tmp_path):
    ids = token_batch()
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8))
    optimizer = torch.optim.SGD(lorakit.trainable_parameters(model).values(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-4, rtol=1e-4)


def test_saving_names_an_adapter_among_several(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, targets=("q_proj",)), "a")
    lorakit.attach(model, LoraConfig(rank=2, targets=("v_proj",)), "b")
    lorakit.set_active(model, "a", "b")
    try:
        lorakit.save_adapter(model, tmp_path)
    except lorakit.AdapterError as err:
        assert "['a', 'b']" in str(err)
    else:
        raise AssertionError("an ambiguous save must be refused")
    lorakit.save_adapter(model, tmp_path, "b")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["target_modules"]) == (2, ["v_proj"])


def test_loaded_adapters_are_frozen_unless_asked(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4))
    lorakit.save_adapter(model, tmp_path)
    frozen, trainable = tiny_llama(), tiny_llama()
    lorakit.load_adapter(frozen, tmp_path, "x")
    lorakit.load_adapter(trainable, tmp_path, "x", trainable=True)
    assert lorakit.trainable_parameters(frozen) == {}
    assert len(lorakit.trainable_parameters(trainable)) == 2 * 14


def test_load_without_activation_keeps_the_active_set(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4), "first")
    lorakit.save_adapter(model, tmp_path)
    lorakit.load_adapter(model, tmp_path, "second", activate=False)
    assert lorakit.active_weights(model) == {"first": 1.0}
    assert lorakit.adapter_names(model) == ["first", "second"]


def test_base_model_name_is_recorded(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    lorakit.attach(model, LoraConfig(rank=4))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["task_type"] == "CAUSAL_LM"
