"""``lorakit compare``, ``lorakit dylora``, ``lorakit continual`` and the method flags of ``lorakit train``,
end to end on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from lorakit.cli.common import TRAIN
from lorakit.cli.main import build_parser, main
from lorakit.data.jsonl import save_jsonl
from lorakit.errors import ConfigError
from lorakit.jobs.compare import compare_methods
from lorakit.jobs.method_runs import smoothed, steps_to
from tests.helpers import copy_examples

TRAIN_FLAGS = ["--steps", "3", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj",
               "--lr", "0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "copy.jsonl"
    save_jsonl(path, copy_examples(16))
    return path


def test_method_flags_and_options_reach_the_train_config():
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--optimizer", "allora",
                                      "--option", "allora_eta=2", "--option", "allora_scale=gradient"])
    config = TRAIN.build(args)
    assert config.optimizer == "allora" and config.options == {"allora_eta": 2, "allora_scale": "gradient"}
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--method", "dylora",
                                      "--option", "dylora_frozen=true", "--regularizer", "ba-lora"])
    assert TRAIN.build(args).options == {"dylora_frozen": True} and TRAIN.build(args).regularizer == "ba-lora"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--option", "no-equals-sign"])


def test_a_refused_combination_is_a_clear_cli_error(base_dir, data, tmp_path, capsys):
    code = main(["train", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--init", "lora-ga", "--method", "dylora", *TRAIN_FLAGS, "--quiet"])
    assert code == 2
    assert "init='lora-ga' does not combine with method='dylora'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_dylora_cli_trains_evaluates_every_rank_and_exports(base_dir, data, tmp_path, capsys):
    out = tmp_path / "dy"
    assert main(["train", "--base", str(base_dir), "--data", str(data), "--out", str(out), "--method", "dylora",
                 *TRAIN_FLAGS, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["dylora", "eval", "--base", str(base_dir), "--adapter", str(out), "--data", str(data),
                 "--ranks", "1,4", "--n", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert sorted(metrics) == ["1", "4"] and metrics["1"]["loss"] != metrics["4"]["loss"]
    assert main(["dylora", "export", "--base", str(base_dir), "--adapter", str(out), "--rank", "2",
                 "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    assert main(["dylora", "export", "--base", str(base_dir), "--adapter", str(out)]) == 2
    assert "needs --rank and --out" in capsys.readouterr().err


def test_loss_smoothing_and_steps_to_a_target():
    assert smoothed([5.0, 3.0, 1.0], window=2) == [5.0, 4.0, 2.0]
    assert steps_to([3.0, 1.0, 1.0, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1], 0.5) == 6  # running mean of 5 <= 0.5
    assert steps_to([3.0, 2.0], 0.5) is None


def test_compare_trains_each_method_once_and_writes_the_report(base_dir, data, tmp_path):
    results = compare_methods(str(data), tmp_path, methods=["lora", "dylora"], train_flags=TRAIN_FLAGS,
                              eval_n=3, target_loss=100.0, base=str(base_dir), progress=False)
    assert [r.method for r in results] == ["lora", "dylora"]
    for result in results:
        assert len(result.losses) == 3 and result.steps_to_target == 1
        # two layers x (q_proj: A 4x64, B 64x4; v_proj: A 4x64, B 32x4 with 2 of 4 heads for keys and values)
        assert result.trainable_parameters == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) and result.peak_memory_mb > 50
        assert result.seconds_per_step > 0 and 0.0 <= result.exact_match <= 1.0
        assert result.command.startswith("lorakit train --data") and "--log-every 1" in result.command
    assert "--method dylora" in results[1].command
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in report["results"]] == ["lora", "dylora"]
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dylora |" in (tmp_path / "methods.md").read_text()
    stamp = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_mtime_ns
    again = compare_methods(str(data), tmp_path, methods=["lora"], train_flags=TRAIN_FLAGS, eval_n=3,
                            target_loss=100.0, base=str(base_dir), progress=False)
    assert again[0] == results[0]  # read back, not trained again
    assert (tmp_path / "lora" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    lower = compare_methods(str(data), tmp_path, methods=["lora"], train_flags=TRAIN_FLAGS, eval_n=3,
                            target_loss=-1.0, base=str(base_dir), progress=False)
    assert lower[0].steps_to_target is None and lower[0].losses == results[0].losses
    with pytest.raises(ConfigError, match="holds a run of"):
        compare_methods(str(data), tmp_path, methods=["lora"], train_flags=[*TRAIN_FLAGS, "--seed", "1"], eval_n=3,
                        base=str(base_dir), progress=False)


def test_compare_trains_again_a_run_that_stopped_before_its_result(base_dir, data, tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a killed run's leftovers
    [result] = compare_methods(str(data), tmp_path, methods=["lora"], train_flags=TRAIN_FLAGS, eval_n=2,
                               base=str(base_dir), progress=False)
    assert len(result.losses) == 3 and 9.0 not in result.losses and "--overwrite" not in result.command


def test_compare_refuses_an_unknown_method(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'qlora'"):
        compare_methods("task:date", tmp_path, methods=["lora", "qlora"])
    assert not any(tmp_path.iterdir())


def test_continual_cli_writes_one_adapter_per_task_and_the_table(base_dir, tmp_path, capsys):
    out = tmp_path / "cl"
    assert main(["continual", "--base", str(base_dir), "--tasks", "caps,date", "--out", str(out), "--n", "8",
                 "--eval-n", "2", "--method", "codyra", "--steps", "2", "--batch-size", "4", "--rank", "2",
                 "--targets", "q_proj", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "continual.json").read_text())
    assert printed == saved and saved["tasks"] == ["caps", "date"]
    assert len(saved["accuracy"]) == 2 and {"transfer", "average", "last"} <= set(saved)
    assert (out / "caps" / "adapter_model.safetensors").is_file() and (out / "date" / "adapter_config.json").is_file()
    assert json.loads((out / "caps" / "adapter_config.json").read_text())["lora_alpha"] == 2  # scale 1
