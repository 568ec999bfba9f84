"""``lorakit demo xlora``: X-LoRA on the real default model, end to end.

Train one LoRA expert per built-in task, train an X-LoRA classifier on a mix of the tasks (it is
never told which task an example comes from), and score on each task's held-out split: the base
model, each expert alone, the uniform weighted sum of the experts, and X-LoRA.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from lorakit.config import TrainConfig
from lorakit.core.activation import active, disabled
from lorakit.data.tasks import get_task
from lorakit.eval.exact_match import evaluate
from lorakit.io.files import save_json
from lorakit.jobs.task_experts import mixed_task_examples, train_task_expert
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.inspection import inspect_xlora
from lorakit.mixtures.xlora.storage import save_xlora
from lorakit.jobs.xlora_mixture import build_xlora
from lorakit.models import DEFAULT_MODEL
from lorakit.train import train

TASKS = ("date", "caps", "units")
XLORA = XLoraConfig(layerwise_scalings=True)


def run_xlora_demo(out: str | Path, *, tasks: tuple[str, ...] = TASKS, expert_steps: int = 50,
                   xlora_steps: int = 40, test_n: int = 50, base: str = DEFAULT_MODEL,
                   report: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the comparison; writes ``results.json``, the X-LoRA model and its scaling plots under ``out``."""
    out = Path(out)
    started = time.perf_counter()
    experts = {}
    for task in tasks:
        report(f"training the {task!r} expert ({expert_steps} steps)")
        train_task_expert(task, out / "experts" / task, steps=expert_steps, base=base)
        experts[task] = out / "experts" / task
    report(f"training the X-LoRA classifier on a mix of {', '.join(tasks)} ({xlora_steps} steps)")
    xmodel, tokenizer = build_xlora(experts, base=base, config=XLORA)
    config = TrainConfig(steps=xlora_steps, batch_size=8, lr=1e-3, log_every=10)
    train(xmodel, tokenizer, mixed_task_examples(tasks, xlora_steps * 8), config, out_dir=out / "xlora", overwrite=True,
          save=lambda directory: save_xlora(xmodel, directory, experts))
    xmodel.eval()
    scores = _score_all(xmodel, tokenizer, tasks, test_n, report)
    inspect_xlora(xmodel, tokenizer, [e for t in tasks for e in get_task(t).examples("test", 8)],
                  get_task(tasks[0]).examples("test", 1)[0], out / "plots")
    results = {"tasks": list(tasks), "expert_steps": expert_steps, "xlora_steps": xlora_steps, "test_n": test_n,
               "exact_match": scores, "seconds": time.perf_counter() - started}
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
