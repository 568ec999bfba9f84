"""The main job on the real default model (SmolLM2-135M-Instruct): a few short, real runs."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.demos.default_demo import run_demo
from lorakit.eval.generate import generate

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"


def test_identity_adapter_leaves_the_greedy_answer_unchanged(real_model):
    model, tokenizer = real_model
    base_answer = generate(model, tokenizer, [QUESTION], max_new_tokens=12)[0]
    assert "Paris" in base_answer
    lorakit.attach(model, lorakit.LoraConfig(rank=8, alpha=16, targets="all-linear"), "identity")
    try:
        assert generate(model, tokenizer, [QUESTION], max_new_tokens=12)[0] == base_answer
        ids = tokenizer(QUESTION, return_tensors="pt").input_ids
        with torch.no_grad():
            adapted = model(ids).logits
            with lorakit.disabled(model):
                torch.testing.assert_close(model(ids).logits, adapted, atol=0, rtol=0)
    finally:
        lorakit.delete_adapter(model, "identity")


def test_a_short_cli_run_trains_and_saves_a_loadable_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "task:reverse", "--n", "8", "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--rank", "4", "--targets", "q_proj,v_proj", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model, _ = lorakit.load_model()
    lorakit.load_adapter(model, out)
    assert lorakit.adapter_names(model) == ["default"]


def test_a_trained_adapter_beats_the_base_model_on_held_out_examples(tmp_path):
    result = run_demo(steps=20, test_n=16, out=tmp_path / "demo", report=lambda *_: None)
    assert result.base.exact_match == 0.0
    assert result.adapted.exact_match >= 0.5
