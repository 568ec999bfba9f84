"""The training loop: resume equivalence, NaN stop, atomic results, schedule, metrics, full fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.train import checkpoint as checkpoint_module
from lorakit.train import loop as loop_module
from lorakit.train import train
from lorakit.train.schedule import learning_rate
from tests.helpers import adapter_model, char_tokenizer, copy_examples, run_interrupted, tiny_llama


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lorakit.trainable_parameters(model).items()}


CONFIG = TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=5e-3, save_every=3, log_every=1, seed=3)


def test_resumed_run_ends_with_the_same_adapter(tmp_path, monkeypatch):
    tokenizer, examples = char_tokenizer(), copy_examples(20)
    straight = adapter_model()
    train(straight, tokenizer, examples, CONFIG, out_dir=tmp_path / "straight", progress=False)

    interrupted = adapter_model()
    run_interrupted(monkeypatch, 4, lambda: train(interrupted, tokenizer, examples, CONFIG,
                                                  out_dir=tmp_path / "resumed", progress=False))
    assert [p.name for p in checkpoint_module.list_checkpoints(tmp_path / "resumed")] == ["step-3"]
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()

    resumed = adapter_model(adapter_seed=99)  # fresh state: everything must come from the checkpoint
    train(resumed, tokenizer, examples, CONFIG, out_dir=tmp_path / "resumed", resume=tmp_path / "resumed",
          progress=False)
    expected, got = adapter_state(straight), adapter_state(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    saved = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    for key in reference:
        torch.testing.assert_close(saved[key], reference[key], atol=1e-6, rtol=0)


def test_resuming_with_other_settings_is_refused(tmp_path):
    tokenizer, examples = char_tokenizer(), copy_examples(12)
    config = TrainConfig(steps=2, batch_size=4, save_every=1)
    train(adapter_model(), tokenizer, examples, config, out_dir=tmp_path, progress=False)
    other = TrainConfig(steps=2, batch_size=2, save_every=1)
    with pytest.raises(lorakit.FormatError, match="batch_size=4, not 2"):
        train(adapter_model(), tokenizer, examples, other, out_dir=tmp_path, resume=tmp_path, progress=False)


def test_checkpoints_hold_no_pickle_and_rotate(tmp_path):
    config = TrainConfig(steps=6, batch_size=4, save_every=2, keep_checkpoints=2, log_every=1)
    train(adapter_model(), char_tokenizer(), copy_examples(12), config, out_dir=tmp_path, progress=False)
    kept = checkpoint_module.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-4", "step-6"]
    assert sorted(p.name for p in kept[-1].iterdir()) == ["optimizer.safetensors", "rng.safetensors",
                                                          "state.json", "trainable.safetensors"]
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["batch_size"] == 4


def test_nan_loss_stops_and_keeps_the_previous_adapter(tmp_path, monkeypatch):
    tokenizer, examples = char_tokenizer(), copy_examples(12)
    config = TrainConfig(steps=4, batch_size=4, save_every=1, log_every=1)
    train(adapter_model(), tokenizer, examples, config, out_dir=tmp_path, progress=False)
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("adapter_")}
    real_loss = loop_module.logits_loss
    calls = {"n": 0}

    def nan_on_third_step(outputs):
        calls["n"] += 1
        loss = real_loss(outputs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(loop_module, "logits_loss", nan_on_third_step)
    model = adapter_model()
    with pytest.raises(lorakit.TrainingError, match=r"became nan at step 3.*step-2"):
        train(model, tokenizer, examples, config, out_dir=tmp_path, overwrite=True, progress=False)
    assert all(torch.isfinite(p).all() for p in lorakit.trainable_parameters(model).values())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("adapter_")} == good


def test_a_full_directory_is_refused_without_overwrite(tmp_path):
    (tmp_path / "something").write_text("keep me")
    with pytest.raises(lorakit.ConfigError, match="not empty"):
        train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1), out_dir=tmp_path,
              progress=False)
    assert (tmp_path / "something").read_text() == "keep me"


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    tokenizer, examples = char_tokenizer(), copy_examples(32)
    model = tiny_llama()  # its random output head is tiny, so the adapter needs it to move the logits
    lorakit.attach(model, LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj", "lm_head")))
    config = TrainConfig(steps=30, batch_size=8, lr=1e-2, log_every=5, eval_every=10)
    result = train(model, tokenizer, examples, config, out_dir=tmp_path, eval_examples=copy_examples(8, seed=1),
                   progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in lines if "eval_loss" in r] == [10, 20, 30]
    assert losses[-1] < 0.7 * losses[0]
    assert result.eval_loss == lines[-1]["eval_loss"]
    assert result.steps == 30 and (tmp_path / "adapter_config.json").is_file()


def test_full_fine_tuning_trains_every_weight(tmp_path):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, char_tokenizer(), copy_examples(8), TrainConfig(steps=2, batch_size=4, lr=1e-3, full=True),
          out_dir=tmp_path, progress=False)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_nothing_to_train_is_an_error():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(lorakit.ConfigError, match="nothing to train"):
        train(model, char_tokenizer(), copy_examples(4), TrainConfig(steps=1), progress=False)


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    values = [learning_rate(s, total=10, warmup=2, peak=1.0, min_ratio=0.1) for s in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == pytest.approx(1.0)
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))
