"""Training runs that start from LoRA-GA or EVA: the saved adapter reproduces the trained model on the
original base, and an interrupted run resumes to the same adapter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.config import TrainConfig
from lorakit.data.jsonl import save_jsonl
from lorakit.io.peft_config import from_peft_dict
from lorakit.train import train
from lorakit.train.prepare import prepare_adapter
from tests.helpers import char_tokenizer, copy_examples, logits, run_interrupted, tiny_llama, token_batch

LORA = lorakit.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
CONFIG = TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, seed=2)


def run(init: str, out, *, resume: bool = False):
    model = tiny_llama()
    examples = copy_examples(16)
    lora = dataclasses.replace(LORA, init=init)
    prepared = prepare_adapter(model, char_tokenizer(), examples, lora, CONFIG, run_dir=out, resume=resume)
    train(model, char_tokenizer(), examples, CONFIG, out_dir=out, overwrite=True, resume=out if resume else None,
          components=prepared.components, progress=False)
    return model.eval()


@pytest.mark.parametrize("init", ["lora-ga", "eva"])
def test_the_saved_adapter_reproduces_the_trained_model_on_the_original_base(init, tmp_path):
    trained = run(init, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    ids = token_batch()
    assert not torch.allclose(logits(tiny_llama(), ids), logits(trained, ids), atol=1e-4)
    torch.testing.assert_close(logits(fresh, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if init == "lora-ga":
        assert config["r"] == 2 * LORA.rank  # [A_f; A_0], [B_f, -B_0]
    else:  # EVA redistributes the ranks but keeps their total
        reloaded = from_peft_dict(config, tmp_path / "adapter_config.json")
        assert sum(p.rank for p in lorakit.plan(tiny_llama(), reloaded)) == \
            sum(p.rank for p in lorakit.plan(tiny_llama(), LORA))


def test_an_interrupted_lora_ga_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    run("lora-ga", tmp_path / "straight")
    run_interrupted(monkeypatch, 3, lambda: run("lora-ga", tmp_path / "resumed"))
    run("lora-ga", tmp_path / "resumed", resume=True)
    straight = (tmp_path / "straight" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == straight


def test_cli_records_the_eva_shapes_so_resume_attaches_them(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    save_jsonl(tmp_path / "train.jsonl", copy_examples(16))
    out = tmp_path / "run"
    args = ["train", "--base", str(base), "--data", str(tmp_path / "train.jsonl"), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--rank", "4", "--targets", "q_proj,v_proj,down_proj", "--init", "eva",
            "--save-every", "1", "--quiet"]
    assert main(args) == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["lora"]["init"] == "eva" and recorded["lora"]["rank_pattern"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == recorded["lora"]["rank_pattern"]
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # attaches the recorded EVA shapes
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_unknown_init_is_refused():
    with pytest.raises(lorakit.ConfigError, match="init='pissa'"):
        dataclasses.replace(LORA, init="pissa")


@pytest.mark.parametrize("init", ["lora-ga", "eva"])
def test_attach_refuses_a_data_driven_init_and_says_what_runs_it(init):
    with pytest.raises(lorakit.ConfigError, match=f"init='{init}' computes the adapter from training data.*prepare"):
        lorakit.attach(tiny_llama(), dataclasses.replace(LORA, init=init))
