"""The mixtures comparison (``lorakit demo mixtures``) on a tiny model: equal budgets, every system
scored, finished stages reused."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from lorakit.data.tasks import get_task
from lorakit.eval.composite import composite_examples, evaluate_composite
from lorakit.eval.exact_match import evaluate
from lorakit.jobs.evaluate import model_with_adapter
from lorakit.jobs.mixture_study import SYSTEMS, MixtureBudget, mixtures_table, run_mixtures_comparison
from lorakit.jobs.xlora_mixture import load_xlora_model

TINY = MixtureBudget(tasks=("date", "caps"), rank=2, expert_steps=1, mixture_steps=1, mixlora_experts=2, top_k=1,
                     test_n=2, composite_prompts=2)


@pytest.fixture(scope="module")
def comparison(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixtures")
    return out, run_mixtures_comparison(out, budget=TINY, base=str(base_dir), report=lambda _: None)


def _by_name(results):
    return {s["system"]: s for s in results["systems"]}


def _saved_parameters(*directories):
    """The number of values in the adapters saved in ``directories``."""
    return sum(tensor.numel() for directory in directories
               for tensor in load_file(directory / "adapter_model.safetensors").values())


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


def test_the_parameter_counts_are_those_of_the_saved_adapters(comparison):
    out, results = comparison
    systems = _by_name(results)
    assert systems["experts"]["trainable_parameters"] == _saved_parameters(*(out / "experts" / t for t in TINY.tasks))
    assert systems["lora-all"]["trainable_parameters"] == _saved_parameters(out / "lora-all")


def test_each_systems_scores_are_those_its_own_saved_model_gets(comparison, base_dir):
    out, results = comparison
    systems = _by_name(results)
    composites = composite_examples(TINY.tasks, per_prompt=len(TINY.tasks), count=TINY.composite_prompts)
    loaders = {"lora-all": lambda: model_with_adapter(str(base_dir), out / "lora-all"),
               "x-lora": lambda: load_xlora_model(out / "x-lora", base=str(base_dir))}
    for name, load in loaders.items():
        model, tokenizer = load()
        model.eval()
        for task in TINY.tasks:
            scored = evaluate(model, tokenizer, get_task(task).examples("test", TINY.test_n), progress=False)
            assert systems[name]["exact_match"][task] == scored.exact_match, (name, task)
        predictions = evaluate_composite(model, tokenizer, composites, max_new_tokens=96).predictions
        assert systems[name]["composite"]["examples"] == predictions[:3], name


def test_the_files_written_hold_the_returned_results(comparison):
    out, results = comparison
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))  # tuples as lists
    for name in SYSTEMS:
        scores = json.loads((out / "scores" / name / "stage.json").read_text())
        assert scores["exact_match"] == _by_name(results)[name]["exact_match"]
