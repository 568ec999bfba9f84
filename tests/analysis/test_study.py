"""The intruder study (``lorakit demo intruders``) on a tiny model: every run trained, analysed,
mitigated (LoRA only) and measured against the base; finished stages reused."""

from __future__ import annotations

import pytest

from lorakit.jobs.intruder_study import IntruderStudy, StudyRun, run_intruder_study, study_table

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
        assert 0.0 <= row["measured"]["exact_match"] <= 1.0
    rows = {row["run"]: row for row in results["rows"][1:]}
    assert rows["full"]["analysis"]["intruders"] >= 0 and (out / "full" / "config.json").is_file()
    assert (out / "lora-r2-mitigated" / "adapter_config.json").is_file()
    assert (out / "analysis" / "rslora-r4" / "analysis.json").is_file()
    assert (out / "intruders_vs_epsilon.png").is_file()
    losses = [row["measured"]["losses"]["caps"] for row in results["rows"]]
    assert len(set(losses)) > 1  # training changed what the model predicts on another task


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
