"""The intruder study (``lorakit demo intruders``) on a tiny model: every run trained, analysed,
mitigated (LoRA only) and measured against the base; finished stages reused."""

from __future__ import annotations

import json

import pytest

from lorakit.data.tasks import get_task
from lorakit.eval.exact_match import evaluate
from lorakit.jobs.evaluate import model_with_adapter
from lorakit.jobs.intruder_study import IntruderStudy, StudyRun, run_intruder_study, study_table
from lorakit.models import load_model

TINY = IntruderStudy(task="date", steps=2, runs=(StudyRun("full", 1e-3), StudyRun("lora-r2", 1e-2, 2),
                                                 StudyRun("rslora-r4", 1e-2, 4, rslora=True)),
                     test_n=2, forgetting_tasks=("caps",), forgetting_n=3)


@pytest.fixture(scope="module")
def study(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_intruder_study(out, study=TINY, base=str(base_dir), report=lambda _: None)


def test_every_run_and_every_lora_runs_mitigation_is_analysed_and_measured(study):
    out, results = study
    assert [row["run"] for row in results["rows"]] == ["base", "full", "lora-r2", "lora-r2-mitigated", "rslora-r4",
                                                       "rslora-r4-mitigated"]
    for row in results["rows"]:
        assert set(row["measured"]["losses"]) == {"caps", "plain text"}
    rows = {row["run"]: row for row in results["rows"][1:]}
    assert (out / "full" / "config.json").is_file()
    for name, row in rows.items():  # each row's analysis is the one written for that run's directory
        written = json.loads((out / "analysis" / name / "analysis.json").read_text())
        assert written["subject"]["path"].endswith(name)
        assert row["analysis"]["intruders"] == written["totals"]["intruders"]
        assert row["analysis"]["norm"] == written["totals"]["norm"]
    assert (out / "lora-r2-mitigated" / "adapter_config.json").is_file()
    assert (out / "analysis" / "rslora-r4" / "analysis.json").is_file()
    assert (out / "intruders_vs_epsilon.png").is_file()
    losses = [row["measured"]["losses"]["caps"] for row in results["rows"]]
    assert len(set(losses)) > 1  # training changed what the model predicts on another task


def test_each_runs_scores_are_those_its_own_saved_model_gets(study, base_dir):
    out, results = study
    rows = {row["run"]: row["measured"] for row in results["rows"]}
    examples = get_task(TINY.task).examples("test", TINY.test_n)
    models = {"base": lambda: load_model(base_dir), "full": lambda: load_model(out / "full"),
              "lora-r2": lambda: model_with_adapter(str(base_dir), out / "lora-r2"),
              "rslora-r4-mitigated": lambda: model_with_adapter(str(base_dir), out / "rslora-r4-mitigated")}
    for name, load in models.items():
        scored = evaluate(*load(), examples, progress=False)
        assert rows[name]["exact_match"] == scored.exact_match, name
        assert rows[name]["task_loss"] == pytest.approx(scored.loss, rel=1e-5), name
    trained = [rows[name]["task_loss"] for name in ("base", "full", "lora-r2", "rslora-r4")]
    assert len(set(trained)) == len(trained)  # four different models, four different losses


def test_the_files_written_hold_the_returned_results(study):
    out, results = study
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))  # tuples as lists
    assert (out / "report.md").read_text() == study_table(results)


def test_the_table_shows_the_base_losses_and_each_runs_change(study):
    _, results = study
    table = study_table(results)
    base = results["rows"][0]["measured"]["losses"]["caps"]
    full = results["rows"][1]["measured"]["losses"]["caps"]
    assert "| base | – | – | " in table and "| – | – | – |" in table and f"{base:.3f}" in table
    assert f"{full - base:+.3f}" in table.splitlines()[3]


def test_a_second_run_reuses_every_stage(study, base_dir):
    out, first = study
    messages = []
    again = run_intruder_study(out, study=TINY, base=str(base_dir), report=messages.append)
    assert sum(m.startswith("reusing") for m in messages) == 1 + 3 + 2 + 5 * 2  # base, trainings, mitigations, 5 x 2
    assert again["rows"] == first["rows"]
