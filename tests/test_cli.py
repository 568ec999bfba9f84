"""The command line, end to end on a tiny model saved to disk: train -> eval -> generate -> merge."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.main import main
from lorakit.data.jsonl import load_jsonl, save_jsonl
from lorakit.data.tasks import get_task, task_names
from lorakit.eval.exact_match import evaluate
from lorakit.eval.generate import generate
from tests.helpers import copy_examples


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A run directory trained by ``lorakit train`` on a JSONL file."""
    root = tmp_path_factory.mktemp("run")
    save_jsonl(root / "train.jsonl", copy_examples(16))
    out = root / "out"
    assert main(["train", "--base", str(base_dir), "--data", str(root / "train.jsonl"), "--out", str(out),
                 "--steps", "4", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj",
                 "--save-every", "2", "--lr", "0.01", "--quiet"]) == 0
    return out


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_writes_a_peft_adapter_checkpoints_and_metrics(trained):
    assert (trained / "adapter_model.safetensors").is_file()
    config = json.loads((trained / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert [p.name for p in (trained / "checkpoints").iterdir()] == ["step-4", "step-2"] or \
        sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-2", "step-4"]
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4]


def test_eval_json_is_the_library_s_evaluation(trained, base_dir, capsys, tmp_path):
    save_jsonl(tmp_path / "test.jsonl", copy_examples(6, seed=5))
    assert main(["eval", "--base", str(base_dir), "--adapter", str(trained), "--data",
                 str(tmp_path / "test.jsonl"), "--json"]) == 0
    metrics = last_json(capsys)
    model, tokenizer = lorakit.load_model(str(base_dir))
    lorakit.load_adapter(model, trained)
    expected = evaluate(model, tokenizer, load_jsonl(tmp_path / "test.jsonl"))
    assert metrics == pytest.approx(expected.metrics())
    assert metrics["n"] == 6


def test_generate_prints_the_library_s_generation(trained, base_dir, capsys):
    assert main(["generate", "--base", str(base_dir), "--adapter", str(trained), "--prompt", "Copy: abc",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    model, tokenizer = lorakit.load_model(str(base_dir))
    lorakit.load_adapter(model, trained)
    assert printed == generate(model, tokenizer, ["Copy: abc"], max_new_tokens=5)


def test_merge_writes_a_model_equal_to_base_plus_adapter(trained, base_dir, tmp_path):
    assert main(["merge", "--base", str(base_dir), "--adapter", str(trained), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    model, _ = lorakit.load_model(str(base_dir))
    lorakit.load_adapter(model, trained)
    ids = torch.randint(0, 99, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_inspect_reports_modules_and_ranks(trained, capsys):
    assert main(["inspect", str(trained)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == 4 and len(report["modules"]) == 4
    assert report["parameters"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)  # q and v in 2 layers
    entry = report["modules"]["model.layers.0.self_attn.v_proj"]
    assert (entry["A_shape"], entry["B_shape"], entry["scale"]) == ([4, 64], [32, 4], 2.0)


def test_resuming_a_finished_run_reproduces_its_adapter(trained, capsys):
    before = (trained / "adapter_model.safetensors").read_bytes()
    assert main(["train", "--resume", str(trained), "--quiet"]) == 0
    assert last_json(capsys)["steps"] == 4
    assert (trained / "adapter_model.safetensors").read_bytes() == before


def test_targets_is_a_dry_run(base_dir, capsys):
    assert main(["targets", "--base", str(base_dir), "--targets", "q_proj,v_proj", "--rank", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("rank=2" in line for line in lines)
    assert lines[0].startswith("model.layers.0.self_attn.q_proj\tLinear[64, 64]")


def test_tasks_list_and_export(capsys, tmp_path):
    assert main(["tasks", "list"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == task_names() and len(listed) >= 6
    assert main(["tasks", "export", "date", "--split", "test", "--n", "3"]) == 0
    (tmp_path / "d.jsonl").write_text(capsys.readouterr().out)
    assert load_jsonl(tmp_path / "d.jsonl") == get_task("date").examples("test", 3)


def test_errors_exit_2_with_a_message(base_dir, tmp_path, capsys):
    assert main(["train", "--base", str(base_dir), "--data", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "lorakit train: error:" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["eval", "--base", str(base_dir), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "inspect", "targets", "tasks", "demo"])
def test_every_subcommand_documents_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: lorakit {command}") and len(text.splitlines()) > 4
