"""``lorakit demo NAME``: every demo is offered exactly the settings it honours, with its true defaults."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli import demo_commands
from lorakit.cli.main import main
from lorakit.demos import default_demo, intruders_demo, mixtures_demo, xlora_demo
from lorakit.jobs.intruder_study import IntruderStudy
from lorakit.jobs.mixture_study import MixtureBudget
from tests.cli.parsers import command_parsers


class Stop(Exception):
    """Raised by a stand-in job once it has seen what the demo passed it."""


def test_each_demo_s_flags_are_its_settings_fields():
    parsers = command_parsers()
    for name, (settings, _) in demo_commands.DEMOS.items():
        flags = {s for a in parsers[f"demo {name}"]._actions for s in a.option_strings} - {"-h", "--help"}
        assert flags == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(settings)}, name


def test_the_demos_defaults_are_the_jobs_own():
    study, demo = IntruderStudy(), intruders_demo.IntrudersDemo()
    assert (demo.task, demo.steps, demo.test_n) == (study.task, study.steps, study.test_n)
    budget = MixtureBudget()
    demo = mixtures_demo.MixturesDemo()
    assert (demo.tasks, demo.expert_steps, demo.mixture_steps, demo.test_n) == \
        (budget.tasks, budget.expert_steps, budget.mixture_steps, budget.test_n)
    assert default_demo.LoraDemo().steps == default_demo.DEMO_TRAINING.steps == 60


@pytest.mark.parametrize("name, flag", [("xlora", "--steps"), ("mixtures", "--steps"), ("intruders", "--tasks"),
                                        ("lora", "--tasks"), ("lora", "--expert-steps")])
def test_a_flag_a_demo_cannot_honour_is_refused(name, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", name, flag, "3"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["demo"], default_demo.LoraDemo()),
    (["demo", "--steps", "20", "--task", "caps"], default_demo.LoraDemo(steps=20, task="caps")),
    (["demo", "lora", "--test-n", "7", "--out", "runs/d"], default_demo.LoraDemo(test_n=7, out="runs/d")),
])
def test_a_bare_demo_is_the_lora_demo_with_its_flags(argv, expected, monkeypatch):
    seen = []
    monkeypatch.setitem(demo_commands.DEMOS, "lora", (default_demo.LoraDemo, seen.append))
    assert main(argv) == 0
    assert seen == [expected]


def test_the_lora_demo_honours_its_settings(monkeypatch):
    asked, reports = [], []

    class Task:
        description = "a stand-in"

        def examples(self, split, n):
            asked.append((split, n))
            return []

    def stop(base):
        raise Stop(base)

    monkeypatch.setattr(default_demo, "get_task", lambda name: asked.append(name) or Task())
    monkeypatch.setattr(default_demo, "load_model", stop)
    with pytest.raises(Stop):
        default_demo.run_demo(default_demo.LoraDemo(task="caps", steps=3, test_n=5), report=reports.append)
    assert asked == ["caps", ("train", 3 * 8), ("test", 5)] and "task 'caps'" in reports[0]


def test_the_xlora_demo_honours_its_settings(monkeypatch, tmp_path):
    seen = []

    def expert(task, out, *, steps, base):
        seen.append((task, out, steps))
        raise Stop

    monkeypatch.setattr(xlora_demo, "train_task_expert", expert)
    with pytest.raises(Stop):
        main(["demo", "xlora", "--tasks", "caps,units", "--expert-steps", "4", "--out", str(tmp_path)])
    assert seen == [("caps", tmp_path / "experts" / "caps", 4)]


def test_the_mixtures_and_intruders_demos_pass_their_settings_to_the_job(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(mixtures_demo, "run_mixtures_comparison",
                        lambda out, *, budget, base, report: seen.update(mixtures=(out, budget)))
    monkeypatch.setattr(intruders_demo, "run_intruder_study",
                        lambda out, *, study, base, report: seen.update(intruders=(out, study)))
    assert main(["demo", "mixtures", "--test-n", "9", "--mixture-steps", "5", "--tasks", "date,add"]) == 0
    assert main(["demo", "intruders", "--task", "caps", "--steps", "6", "--test-n", "8", "--out", str(tmp_path)]) == 0
    assert seen["mixtures"] == ("runs/mixtures", MixtureBudget(tasks=("date", "add"), mixture_steps=5, test_n=9))
    assert seen["intruders"] == (str(tmp_path), IntruderStudy(task="caps", steps=6, test_n=8))
