"""Several adapters trained in one batch: exact per-adapter gradients and updates, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.config import TrainConfig
from lorakit.data.batching import collate
from lorakit.data.encoding import encode
from lorakit.data.example import Example
from lorakit.data.jsonl import save_jsonl
from lorakit.models.supervised_loss import (
    adapter_token_counts,
    logits_loss,
    per_adapter_loss,
    supervised_outputs,
    supervised_tokens,
)
from lorakit.train import train
from lorakit.train.multi import train_adapters
from tests.helpers import char_tokenizer, copy_examples, tiny_llama

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "lm_head"))


def upper_examples(n: int) -> list[Example]:
    return [Example(prompt=f"Up: {e.completion}", completion=e.completion.upper()) for e in copy_examples(n, seed=3)]


def two_adapters(seed: int = 0):
    model = tiny_llama()
    torch.manual_seed(seed)
    for name in ("copy", "upper"):
        lorakit.attach(model, LORA, name, activate=False)
    return model


def test_the_joint_loss_gives_each_adapter_the_gradient_of_its_own_mean_loss():
    tokenizer, model = char_tokenizer(), two_adapters()
    data = {"copy": copy_examples(3), "upper": upper_examples(2)}
    encoded = [dataclasses.replace(encode(e, tokenizer, chat=True, max_length=64), adapter=name)
               for name, examples in data.items() for e in examples]
    batch = collate(encoded, pad_id=0)
    assert batch["adapter_per_row"] == ["copy"] * 3 + ["upper"] * 2
    per_adapter_loss(supervised_outputs(model, batch), batch, adapter_token_counts([batch])).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name, rows in (("copy", slice(0, 3)), ("upper", slice(3, 5))):
        own = {k: v[rows] for k, v in batch.items() if k != "adapter_per_row"}
        with lorakit.active(model, name):
            (logits_loss(supervised_outputs(model, own)) / supervised_tokens(own)).backward()
    alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert joint.keys() == alone.keys() and len(joint) == 2 * 5 * 2  # 2 adapters x 5 modules x (A, B)
    for key in joint:
        torch.testing.assert_close(joint[key], alone[key], atol=1e-6, rtol=1e-5, msg=key)


def test_joint_training_equals_training_each_adapter_alone(tmp_path):
    tokenizer = char_tokenizer()
    data = {"copy": copy_examples(6), "upper": upper_examples(4)}
    common = dict(steps=4, lr=1e-2, bucket=False, max_grad_norm=0.05, seed=1)  # clipping is per adapter
    joint = two_adapters()
    train_adapters(joint, tokenizer, data, TrainConfig(batch_size=10, **common), out_dir=tmp_path / "joint",
                   progress=False)
    for name, examples in data.items():
        alone = two_adapters()
        lorakit.set_active(alone, name)
        train(alone, tokenizer, examples, TrainConfig(batch_size=len(examples), **common), progress=False)
        for key, parameter in alone.named_parameters():
            if f".{name}." in key:
                torch.testing.assert_close(dict(joint.named_parameters())[key], parameter, atol=1e-6, rtol=1e-5,
                                           msg=key)
        loaded = tiny_llama()
        lorakit.load_adapter(loaded, tmp_path / "joint" / name)
        ids = torch.tensor([[5, 6, 7, 8]])
        with lorakit.active(alone, name), torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, alone(ids).logits, atol=1e-5, rtol=0)


def test_joint_training_refuses_what_it_cannot_do():
    model = two_adapters()
    data = {"copy": copy_examples(4), "upper": upper_examples(4)}
    with pytest.raises(lorakit.ConfigError, match="packed row"):
        train_adapters(model, char_tokenizer(), data, TrainConfig(pack=True))
    with pytest.raises(lorakit.ConfigError, match="plain LoRA and AdamW"):
        train_adapters(model, char_tokenizer(), data, TrainConfig(optimizer="allora"))
    with pytest.raises(lorakit.ConfigError, match=r"\['other'\]"):
        train_adapters(model, char_tokenizer(), {**data, "other": copy_examples(2)}, TrainConfig(steps=1))


def test_the_cli_trains_one_adapter_per_name_and_resumes(base_dir, tmp_path, capsys):
    save_jsonl(tmp_path / "copy.jsonl", copy_examples(8))
    save_jsonl(tmp_path / "upper.jsonl", upper_examples(8))
    out = tmp_path / "multi"
    flags = ["--base", str(base_dir), "--out", str(out), "--steps", "2", "--batch-size", "4", "--rank", "2",
             "--targets", "q_proj", "--quiet", "--save-every", "1"]
    assert main(["train", "--data", f"copy={tmp_path / 'copy.jsonl'}", "--data",
                 f"upper={tmp_path / 'upper.jsonl'}", *flags]) == 0
    assert (out / "copy" / "adapter_model.safetensors").is_file() and (out / "upper" / "adapter_config.json").is_file()
    assert json.loads((out / "run.json").read_text())["datasets"]["upper"].endswith("upper.jsonl")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # already finished: resumes at the last step
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["train", "--data", "copy=x.jsonl", "--data", "copy=y.jsonl", *flags]) == 2
    assert "repeat" in capsys.readouterr().err
