"""``lorakit train --method pat`` end to end on a tiny Llama: the run writes one narrower model directory that
``lorakit.load`` loads and that generates; what PAT cannot do is refused before anything is written; an
interrupted run resumes to the uninterrupted one's model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, TrainConfig
from lorakit.cli.main import main
from lorakit.errors import ModelError
from lorakit.eval.generate import generate
from lorakit.jobs.finetune import finetune, resume_finetune
from lorakit.pruning.pat_model import attach_pat
from lorakit.quant.model_quantization import quantize_model
from lorakit.quant.nf_config import NFConfig
from tests.helpers import run_interrupted, tiny_llama

FLAGS = ["--steps", "6", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "0.01", "--n", "16", "--quiet"]


def test_the_cli_trains_pat_and_writes_one_narrower_model(base_dir, tmp_path, capsys):
    out = tmp_path / "pat"
    assert main(["train", "--base", str(base_dir), "--data", "task:caps", "--out", str(out), "--method", "pat",
                 "--option", "pat_keep=0.75", "--option", "pat_rank=4", *FLAGS]) == 0
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "lorakit.json").read_text()) == {"format": 1, "kind": "model", "origin": "pat"}
    record = json.loads((out / "pat.json").read_text())
    assert record["width"] == 64 and record["kept"] == 48
    assert record["parameters_after"] < record["parameters_before"]
    terms = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("pat_mask" in row and "pat_identity" in row for row in terms)
    loaded = lorakit.load(out)
    assert loaded.kind == "model" and loaded.model.config.hidden_size == 48
    texts = generate(loaded.model, loaded.tokenizer, ["abc"], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", "task:caps", "--n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--option", "pat_keep=1.5"], "pat_keep is 1.5"),
    (["--option", "pat_rank=0"], "pat_rank is 0"),
    (["--optimizer", "lora-pro"], "does not combine with method='pat'"),
    (["--regularizer", "ba-lora"], "does not combine with method='pat'"),
    (["--full"], "full fine-tuning cannot use"),
    (["--fsdp"], "and method='pat' reads or replaces whole factors"),
    (["--chunk-size", "4"], "PatTraining adds a loss"),
])
def test_what_pat_cannot_do_is_refused_before_anything_is_written(base_dir, tmp_path, capsys, flags, message):
    code = main(["train", "--base", str(base_dir), "--data", "task:caps", "--out", str(tmp_path / "r"),
                 "--method", "pat", *flags, *FLAGS])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_quantized_base_is_refused_as_pat_attaches():
    model = tiny_llama()
    quantize_model(model, NFConfig())
    with pytest.raises(ModelError, match="PAT folds dense weights"):
        attach_pat(model)


def _pat_run(base_dir, out, **changes):
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, method="pat", options={"pat_rank": 4}, save_every=1,
                         **changes)
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    return finetune("task:caps", out, base=str(base_dir), lora=lora, config=config, n=16, progress=False)


def _same_model(one, other) -> bool:
    ours, theirs = load_file(str(one / "model.safetensors")), load_file(str(other / "model.safetensors"))
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_interrupted_pat_run_resumes_to_the_same_model(base_dir, tmp_path, monkeypatch):
    _pat_run(base_dir, tmp_path / "straight")
    run_interrupted(monkeypatch, 5, lambda: _pat_run(base_dir, tmp_path / "resumed"))  # step 5: the hard phase
    resume_finetune(tmp_path / "resumed", progress=False)
    assert _same_model(tmp_path / "straight", tmp_path / "resumed")
    _pat_run(base_dir, tmp_path / "recomputed", gradient_checkpointing=True)  # the hooks run again in recompute
    assert _same_model(tmp_path / "straight", tmp_path / "recomputed")
