"""The mixtures comparison (``lorakit demo mixtures``) on a tiny model: equal budgets, every system
scored, finished stages reused."""

from __future__ import annotations

import pytest

from lorakit.jobs.mixture_study import SYSTEMS, MixtureBudget, mixtures_table, run_mixtures_comparison

TINY = MixtureBudget(tasks=("date", "caps"), rank=2, expert_steps=1, mixture_steps=1, mixlora_experts=2, top_k=1,
                     test_n=2, composite_prompts=2)


@pytest.fixture(scope="module")
def comparison(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixtures")
    return out, run_mixtures_comparison(out, budget=TINY, base=str(base_dir), report=lambda _: None)


def _by_name(results):
    return {s["system"]: s for s in results["systems"]}


def test_the_systems_share_one_step_budget_and_the_single_lora_has_the_experts_parameters(comparison):
    _, results = comparison
    systems = _by_name(results)
    assert [s["system"] for s in results["systems"]] == list(SYSTEMS)
    assert {name: s["steps"] for name, s in systems.items()} == {
        "experts": 2, "lora-all": 3, "mixlora": 3, "meteora": 3, "x-lora": 3}  # 2 x 1 expert step + 1 gate step
    assert systems["lora-all"]["trainable_parameters"] == systems["experts"]["trainable_parameters"]
    for mixture in ("meteora", "x-lora"):
        gates = systems[mixture]["gate_parameters"]
        assert gates > 0
        assert systems[mixture]["trainable_parameters"] == systems["experts"]["trainable_parameters"] + gates


def test_every_system_is_scored_per_task_and_all_but_the_oracle_on_composite_prompts(comparison):
    _, results = comparison
    for system in results["systems"]:
        assert set(system["exact_match"]) == set(TINY.tasks)
        assert all(0.0 <= value <= 1.0 for value in system["exact_match"].values())
        if system["system"] == "experts":
            assert "composite" not in system
        else:
            assert set(system["composite"]["per_task"]) == set(TINY.tasks)
            assert system["composite"]["n_prompts"] == TINY.composite_prompts


def test_a_second_run_reuses_every_finished_stage(comparison, base_dir):
    out, first = comparison
    adapter = out / "lora-all" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    messages = []
    again = run_mixtures_comparison(out, budget=TINY, base=str(base_dir), report=messages.append)
    reused = [m for m in messages if m.startswith("reusing")]
    assert len(reused) == len(TINY.tasks) + 4 + len(SYSTEMS)  # experts, four trainings, every scoring
    assert adapter.stat().st_mtime_ns == written
    assert _by_name(again)["x-lora"]["exact_match"] == _by_name(first)["x-lora"]["exact_match"]


def test_the_table_has_a_column_per_system_and_a_row_per_task(comparison):
    out, results = comparison
    table = mixtures_table(results)
    assert table == (out / "report.md").read_text()
    header = table.splitlines()[0]
    assert all(f"`{name}`" in header for name in SYSTEMS)
    assert "| held-out `caps` |" in table and "| composite: `date` answers |" in table
    experts_composite = [line for line in table.splitlines() if line.startswith("| composite: all answers")][0]
    assert experts_composite.split("|")[2].strip() == "–"
