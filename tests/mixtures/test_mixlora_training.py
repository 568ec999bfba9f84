"""MixLoRA through the trainer and the CLI: ``lorakit train --method mixlora``, resume, evaluation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.config import TrainConfig
from lorakit.data.jsonl import save_jsonl
from lorakit.mixtures.mixlora import MixLoraConfig, attach_mixlora, load_mixlora, mixlora_layers
from lorakit.train import train
from lorakit.train.combinations import check_combination
from tests.helpers import char_tokenizer, copy_examples, logits, run_interrupted, tiny_llama, token_batch

MIX = MixLoraConfig(num_experts=4, top_k=2, rank=2, alpha=4, dropout=0.0, attention_targets=("q_proj",))


def mixlora_model():
    model = tiny_llama()
    attach_mixlora(model, MIX, seed=0)
    return model


def test_the_trainer_adds_the_aux_loss_and_resumes_exactly(tmp_path, monkeypatch):
    tokenizer, examples = char_tokenizer(), copy_examples(16)
    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, log_every=1, method="mixlora",
                         regularizer=None, options={"mixlora_aux_loss_coefficient": 0.5})
    straight = mixlora_model()
    routers = [layer.router.weight.detach().clone() for _, layer in mixlora_layers(straight)]
    train(straight, tokenizer, examples, config, out_dir=tmp_path / "a", progress=False)
    assert all(not torch.equal(layer.router.weight, before)
               for (_, layer), before in zip(mixlora_layers(straight), routers, strict=True))
    interrupted = mixlora_model()
    run_interrupted(monkeypatch, 3, lambda: train(interrupted, tokenizer, examples, config, out_dir=tmp_path / "b",
                                                  progress=False))
    resumed = mixlora_model()
    train(resumed, tokenizer, examples, config, out_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    for (name, p), q in zip(lorakit.trainable_parameters(straight).items(),
                            lorakit.trainable_parameters(resumed).values(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    loaded = tiny_llama()
    load_mixlora(loaded, tmp_path / "a")
    torch.testing.assert_close(logits(loaded, token_batch()), logits(straight.eval(), token_batch()), atol=1e-6,
                               rtol=0)


def test_mixlora_refuses_the_inits_and_optimizers_it_does_not_combine_with():
    lora = lorakit.LoraConfig(rank=2)
    for init, optimizer, message in [("lora-ga", "adamw", "init='lora-ga'"), ("eva", "adamw", "init='eva'"),
                                     ("kaiming", "lora-pro", "optimizer='lora-pro'")]:
        with pytest.raises(lorakit.ConfigError, match=message):
            check_combination(dataclasses.replace(lora, init=init), TrainConfig(method="mixlora", optimizer=optimizer))


def test_cli_trains_evaluates_and_generates_with_mixlora(base_dir, tmp_path, capsys):
    save_jsonl(tmp_path / "copy.jsonl", copy_examples(8))
    out = tmp_path / "mix"
    assert main(["train", "--base", str(base_dir), "--data", str(tmp_path / "copy.jsonl"), "--out", str(out),
                 "--method", "mixlora", "--option", "mixlora_experts=3", "--option", "mixlora_top_k=1",
                 "--rank", "2", "--targets", "q_proj,v_proj", "--steps", "2", "--batch-size", "4", "--quiet"]) == 0
    saved = json.loads((out / "mixlora_config.json").read_text())
    assert "expert2" in json.dumps(saved) and "expert3" not in json.dumps(saved)
    capsys.readouterr()
    assert main(["eval", "--base", str(base_dir), "--adapter", str(out), "--data", str(tmp_path / "copy.jsonl"),
                 "--n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2
