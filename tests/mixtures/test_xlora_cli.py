"""``lorakit xlora train|eval|generate|inspect`` on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.cli.main import main
from lorakit.data.jsonl import save_jsonl
from lorakit.mixtures.xlora.storage import load_xlora
from tests.helpers import char_tokenizer, copy_examples, perturb, tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlora-cli")
    tiny_llama().save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    for index, (name, targets) in enumerate({"one": "all-linear", "two": ("q_proj", "v_proj")}.items()):
        model = tiny_llama()
        lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets=targets), name)
        perturb(model, name, seed=index)
        lorakit.save_adapter(model, root / "experts" / name)
    save_jsonl(root / "train.jsonl", copy_examples(12))
    out = root / "xlora"
    assert main(["xlora", "train", "--base", str(root / "base"), "--expert", f"one={root / 'experts/one'}",
                 "--expert", f"two={root / 'experts/two'}", "--data", str(root / "train.jsonl"), "--out", str(out),
                 "--steps", "3", "--batch-size", "4", "--lr", "0.01", "--layerwise", "--top-k", "1",
                 "--bundle", "--save-every", "3", "--quiet"]) == 0
    return root, out


def test_train_writes_a_self_contained_xlora_directory(setup):
    root, out = setup
    saved = json.loads((out / "xlora_config.json").read_text())
    assert [e["name"] for e in saved["experts"]] == ["one", "two"]
    assert saved["xlora"]["top_k"] == 1 and saved["xlora"]["layerwise_scalings"] is True
    assert (out / "experts/one/adapter_model.safetensors").is_file()
    assert (out / "checkpoints/step-3/trainable.safetensors").is_file()
    model = load_xlora(lorakit.load_model(str(root / "base"))[0], out)
    assert model.n_layers == 14


def test_eval_generate_and_inspect(setup, capsys, tmp_path):
    root, out = setup
    save_jsonl(tmp_path / "test.jsonl", copy_examples(4, seed=3))
    assert main(["xlora", "eval", "--base", str(root / "base"), "--xlora", str(out), "--data",
                 str(tmp_path / "test.jsonl"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 4 and metrics["loss"] > 0
    assert main(["xlora", "generate", "--base", str(root / "base"), "--xlora", str(out), "--prompt", "Copy: ab",
                 "--max-new-tokens", "4"]) == 0
    cached = capsys.readouterr().out
    assert main(["xlora", "generate", "--base", str(root / "base"), "--xlora", str(out), "--prompt", "Copy: ab",
                 "--max-new-tokens", "1", "--reuse-prompt-scalings"]) == 0
    first_token = capsys.readouterr().out
    assert cached.startswith(first_token.rstrip("\n"))  # the first new token never depends on reuse
    assert main(["xlora", "inspect", "--base", str(root / "base"), "--xlora", str(out), "--data",
                 str(tmp_path / "test.jsonl"), "--out-dir", str(tmp_path / "plots")]) == 0
    report = json.loads((tmp_path / "plots" / "scalings.json").read_text())
    assert report["mean_scalings"]["experts"] == ["one", "two"]
    for plot in report["plots"]:
        assert (tmp_path / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_expert_arguments_are_reported(setup, capsys):
    root, _ = setup
    assert main(["xlora", "train", "--base", str(root / "base"), "--expert", "oops", "--data", "x", "--out",
                 str(root / "never")]) == 2
    assert "lorakit xlora train: error: --expert 'oops' is not NAME=DIR" in capsys.readouterr().err
    assert main(["xlora", "train", "--base", str(root / "base"), "--expert", f"one={root / 'nowhere'}",
                 "--data", str(root / "train.jsonl"), "--out", str(root / "never2")]) == 2
    assert "no such adapter directory" in capsys.readouterr().err
    assert not (root / "never2").exists()
