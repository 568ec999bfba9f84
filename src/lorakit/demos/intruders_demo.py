"""``lorakit demo intruders``: the intruder-dimension study (:mod:`lorakit.jobs.intruder_study`) on the
default model; finished stages resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lorakit.jobs.intruder_study import IntruderStudy, run_intruder_study
from lorakit.models import DEFAULT_MODEL


@dataclass(frozen=True, kw_only=True)
class IntrudersDemo:
    """Full fine-tuning and LoRA at several ranks: intruder dimensions, accuracy, forgetting (~45 min)."""

    out: str = "runs/intruders"
    """Where every run, results.json, report.md and the plot go."""
    task: str = IntruderStudy.task
    """The built-in task every run trains on."""
    steps: int = IntruderStudy.steps
    """Optimizer steps of each run (lora-r8-long keeps its own, longer count)."""
    test_n: int = IntruderStudy.test_n
    """Held-out examples scored per run."""


def run_intruders_demo(demo: IntrudersDemo = IntrudersDemo(), *, base: str = DEFAULT_MODEL,
                       report: Callable[[str], Any] = print, **changes) -> dict:
    """Run (or resume) the study of ``demo`` with ``changes``; returns its results."""
    demo = replace(demo, **changes)
    study = IntruderStudy(task=demo.task, steps=demo.steps, test_n=demo.test_n)
    return run_intruder_study(demo.out, study=study, base=base, report=report)
