"""``lorakit demo mixtures``: one LoRA on all tasks vs MixLoRA vs MeteoRA vs X-LoRA at one training budget
(:mod:`lorakit.jobs.mixture_study`); finished stages resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lorakit.jobs.mixture_study import MixtureBudget, run_mixtures_comparison
from lorakit.models import DEFAULT_MODEL


@dataclass(frozen=True, kw_only=True)
class MixturesDemo:
    """One LoRA on all tasks vs MixLoRA vs MeteoRA vs X-LoRA, one budget (~1 h; finished stages resume)."""

    out: str = "runs/mixtures"
    """Where every system's run, results.json and report.md go."""
    tasks: tuple[str, ...] = MixtureBudget.tasks
    """The built-in tasks: an expert each, and the mix every system trains on."""
    expert_steps: int = MixtureBudget.expert_steps
    """Optimizer steps of each task expert."""
    mixture_steps: int = MixtureBudget.mixture_steps
    """Optimizer steps of each mixture's gates (every system gets the same total)."""
    test_n: int = MixtureBudget.test_n
    """Held-out examples scored per task and system."""


def run_mixtures_demo(demo: MixturesDemo = MixturesDemo(), *, base: str = DEFAULT_MODEL,
                      report: Callable[[str], Any] = print, **changes) -> dict[str, Any]:
    """Run (or resume) the comparison of ``demo`` with ``changes``; returns its results."""
    demo = replace(demo, **changes)
    budget = MixtureBudget(tasks=demo.tasks, expert_steps=demo.expert_steps, mixture_steps=demo.mixture_steps,
                           test_n=demo.test_n)
    return run_mixtures_comparison(demo.out, budget=budget, base=base, report=report)
