"""``lorakit demo xlora``: X-LoRA on the real default model, end to end.

Train one LoRA expert per built-in task, train an X-LoRA classifier on a mix of the tasks (it is
never told which task an example comes from), and score on each task's held-out split: the base
model, each expert alone, the uniform weighted sum of the experts, and X-LoRA.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from lorakit.config import TrainConfig
from lorakit.core.activation import active, disabled
from lorakit.data.tasks import get_task
from lorakit.eval.exact_match import evaluate
from lorakit.io.files import save_json
from lorakit.jobs.task_experts import mixed_task_examples, train_task_expert
from lorakit.jobs.xlora_mixture import build_xlora
from lorakit.methods.component import WritesResult
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.inspection import inspect_xlora
from lorakit.mixtures.xlora.storage import save_xlora
from lorakit.models import DEFAULT_MODEL
from lorakit.train import train

XLORA = XLoraConfig(layerwise_scalings=True)


@dataclass(frozen=True, kw_only=True)
class XLoraDemo:
    """A LoRA expert per task, then X-LoRA over them, against each expert and their uniform sum (~20 min)."""

    out: str = "runs/xlora-demo"
    """Where the experts, the X-LoRA model, its scaling plots and results.json go."""
    tasks: tuple[str, ...] = ("date", "caps", "units")
    """The built-in tasks: one expert each, and the mix X-LoRA trains on."""
    expert_steps: int = 50
    """Optimizer steps of each expert."""
    xlora_steps: int = 40
    """Optimizer steps of the X-LoRA classifier."""
    test_n: int = 50
    """Held-out examples scored per task and system."""


def run_xlora_demo(demo: XLoraDemo = XLoraDemo(), *, base: str = DEFAULT_MODEL,
                   report: Callable[[str], Any] = print, **changes) -> dict[str, Any]:
    """Run the comparison (``demo`` with ``changes``); writes ``results.json``, the X-LoRA model and its
    scaling plots under ``demo.out``."""
    demo = replace(demo, **changes)
    out, tasks = Path(demo.out), demo.tasks
    started = time.perf_counter()
    experts = {}
    for task in tasks:
        report(f"training the {task!r} expert ({demo.expert_steps} steps)")
        train_task_expert(task, out / "experts" / task, steps=demo.expert_steps, base=base)
        experts[task] = out / "experts" / task
    report(f"training the X-LoRA classifier on a mix of {', '.join(tasks)} ({demo.xlora_steps} steps)")
    xmodel, tokenizer = build_xlora(experts, base=base, config=XLORA)
    config = TrainConfig(steps=demo.xlora_steps, batch_size=8, lr=1e-3, log_every=10, keep_freed_memory=True)
    train(xmodel, tokenizer, mixed_task_examples(tasks, demo.xlora_steps * 8), config, out_dir=out / "xlora",
          overwrite=True, components=[WritesResult(lambda directory: save_xlora(xmodel, directory, experts))])
    xmodel.eval()
    scores = _score_all(xmodel, tokenizer, tasks, demo.test_n, report)
    inspect_xlora(xmodel, tokenizer, [e for t in tasks for e in get_task(t).examples("test", 8)],
                  get_task(tasks[0]).examples("test", 1)[0], out / "plots")
    results = {"tasks": list(tasks), "expert_steps": demo.expert_steps, "xlora_steps": demo.xlora_steps,
               "test_n": demo.test_n, "exact_match": scores, "seconds": time.perf_counter() - started}
    save_json(out / "results.json", results)
    report(json.dumps(results, indent=1))
    return results


def _score_all(xmodel, tokenizer, tasks: tuple[str, ...], test_n: int, report) -> dict[str, dict[str, float]]:
    """Held-out exact match per task (rows) for each system (columns)."""
    base_model = xmodel.base
    systems: dict[str, Callable[[list], float]] = {}

    def score_with(context):
        def score(examples):
            with context():
                return evaluate(base_model, tokenizer, examples).exact_match
        return score

    systems["base"] = score_with(lambda: disabled(base_model))
    for task in tasks:
        systems[f"expert:{task}"] = score_with(lambda task=task: active(base_model, task))
    systems["uniform sum"] = score_with(lambda: active(base_model, *tasks, weights=[1 / len(tasks)] * len(tasks)))
    systems["x-lora"] = lambda examples: evaluate(xmodel, tokenizer, examples).exact_match
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        examples = get_task(task).examples("test", test_n)
        scores[task] = {name: score(examples) for name, score in systems.items()}
        report(f"{task}: " + ", ".join(f"{name} {value:.0%}" for name, value in scores[task].items()))
    return scores
