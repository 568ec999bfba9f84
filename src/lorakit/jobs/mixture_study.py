"""``lorakit demo mixtures``: one LoRA on all tasks vs MixLoRA vs MeteoRA vs X-LoRA, one budget.

Every system sees the same shuffled mix of built-in tasks and the same number of optimizer steps
(batch 8), and trains about the same number of parameters:

* ``experts`` (the oracle reference): one rank-r all-linear LoRA per task, ``expert_steps`` each on
  its own task, each scored on its own task only (it is told the task);
* ``lora-all``: one all-linear LoRA of rank ``r * N`` (as many parameters as the N experts together)
  for ``N * expert_steps + mixture_steps`` steps on the mix;
* ``mixlora``: MixLoRA with ``mixlora_experts`` rank-r FFN experts (top-k) and a rank-r attention
  adapter, for the same number of steps on the mix;
* ``meteora`` and ``x-lora``: the N task experts above, then ``mixture_steps`` steps of gate
  (classifier) training on the mix, the experts frozen.

Scored: held-out exact match per task, and composite prompts holding one question of every task,
each answer scored with its own task's metric (:mod:`lorakit.eval.composite`). Each stage is a
:func:`lorakit.jobs.stages.run_stage`, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.config import LoraConfig, TrainConfig
from lorakit.data.jsonl import save_jsonl
from lorakit.data.tasks import get_task
from lorakit.eval.composite import composite_examples, evaluate_composite
from lorakit.eval.exact_match import evaluate
from lorakit.io.files import save_json
from lorakit.jobs.stages import run_stage
from lorakit.jobs.task_experts import EXPERT_LR, mixed_task_examples, train_task_expert
from lorakit.models import DEFAULT_MODEL

SYSTEMS = ("experts", "lora-all", "mixlora", "meteora", "x-lora")


@dataclass(frozen=True)
class MixtureBudget:
    """The shared budget of the comparison (the defaults are the reported run's)."""

    tasks: tuple[str, ...] = ("date", "caps", "units")
    rank: int = 16
    expert_steps: int = 50
    mixture_steps: int = 40
    mixlora_experts: int = 4
    top_k: int = 2
    test_n: int = 50
    composite_prompts: int = 30

    @property
    def total_steps(self) -> int:
        """Optimizer steps every system gets: the experts' plus the gates'."""
        return len(self.tasks) * self.expert_steps + self.mixture_steps

    @property
    def expert_lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=2 * self.rank, targets="all-linear")


def _train_config(steps: int, **extra: Any) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=EXPERT_LR, log_every=10, keep_freed_memory=True, **extra)


def _train_systems(out: Path, budget: MixtureBudget, base: str, report) -> dict[str, dict[str, Any]]:
    from lorakit.jobs.finetune import finetune
    from lorakit.jobs.meteora_mixture import train_meteora
    from lorakit.jobs.xlora_mixture import train_xlora
    from lorakit.mixtures.meteora import MeteoraConfig
    from lorakit.mixtures.xlora import XLoraConfig
    mix = out / "data" / "train.jsonl"
    if not mix.is_file():
        mix.parent.mkdir(parents=True, exist_ok=True)
        save_jsonl(mix, mixed_task_examples(budget.tasks, budget.total_steps * 8))
    experts = {task: out / "experts" / task for task in budget.tasks}
    runs: dict[str, dict[str, Any]] = {}
    for task, directory in experts.items():
        report(f"expert {task!r}: {budget.expert_steps} steps")
        runs[f"expert:{task}"] = run_stage(directory, lambda task=task: train_task_expert(
            task, experts[task], steps=budget.expert_steps, lora=budget.expert_lora, base=base).summary(), report)
    runs["experts"] = {"trainable_parameters": sum(runs[f"expert:{t}"]["trainable_parameters"] for t in budget.tasks),
                       "steps": len(budget.tasks) * budget.expert_steps}
    n = len(budget.tasks)
    one_lora = LoraConfig(rank=budget.rank * n, alpha=2 * budget.rank * n, targets="all-linear")
    mixlora_options = {"mixlora_experts": budget.mixlora_experts, "mixlora_top_k": budget.top_k}
    trainers = {
        "lora-all": lambda: finetune(str(mix), out / "lora-all", base=base, lora=one_lora,
                                     config=_train_config(budget.total_steps), overwrite=True),
        "mixlora": lambda: finetune(str(mix), out / "mixlora", base=base, lora=budget.expert_lora, overwrite=True,
                                    config=_train_config(budget.total_steps, method="mixlora",
                                                         options=mixlora_options)),
        "meteora": lambda: train_meteora(str(mix), out / "meteora", experts, base=base, overwrite=True,
                                         meteora=MeteoraConfig(top_k=budget.top_k),
                                         config=_train_config(budget.mixture_steps)),
        "x-lora": lambda: train_xlora(str(mix), out / "x-lora", experts, base=base, overwrite=True,
                                      xlora=XLoraConfig(layerwise_scalings=True),
                                      config=_train_config(budget.mixture_steps)),
    }
    for name, trainer in trainers.items():
        report(f"{name}: training")
        runs[name] = run_stage(out / name, lambda trainer=trainer: trainer().summary(), report)
    experts_total = runs["experts"]
    for name in ("meteora", "x-lora"):  # the experts are part of what these systems trained
        gates = runs[name]["trainable_parameters"]
        runs[name] = {**runs[name], "gate_parameters": gates,
                      "trainable_parameters": gates + experts_total["trainable_parameters"],
                      "steps": experts_total["steps"] + runs[name]["steps"]}
    return runs


def _loaders(out: Path, base: str) -> dict[str, Callable[[str], tuple]]:
    """For each system: task -> (model, tokenizer). Only the experts' model depends on the task."""
    from lorakit.jobs.evaluate import model_with_adapter
    from lorakit.jobs.meteora_mixture import load_meteora_model
    from lorakit.jobs.xlora_mixture import load_xlora_model
    return {
        "experts": lambda task: model_with_adapter(base, out / "experts" / task),
        "lora-all": lambda task: model_with_adapter(base, out / "lora-all"),
        "mixlora": lambda task: model_with_adapter(base, out / "mixlora"),
        "meteora": lambda task: load_meteora_model(out / "meteora", base=base),
        "x-lora": lambda task: load_xlora_model(out / "x-lora", base=base),
    }


def _score_system(name: str, load: Callable[[str], tuple], budget: MixtureBudget) -> dict[str, Any]:
    """Held-out exact match per task and, for a system not told the task, the composite prompts."""
    per_task = name == "experts"
    shared = None if per_task else load(budget.tasks[0])
    exact_match = {}
    for task in budget.tasks:
        model, tokenizer = load(task) if per_task else shared
        model.eval()
        examples = get_task(task).examples("test", budget.test_n)
        exact_match[task] = evaluate(model, tokenizer, examples, progress=True).exact_match
    scores: dict[str, Any] = {"exact_match": exact_match}
    if not per_task:  # the oracle needs the task; a composite prompt has several
        composites = composite_examples(budget.tasks, per_prompt=len(budget.tasks), count=budget.composite_prompts)
        result = evaluate_composite(*shared, composites, max_new_tokens=96)
        scores["composite"] = {**result.metrics(), "examples": result.predictions[:3]}
    return scores


def run_mixtures_comparison(out: str | Path, *, budget: MixtureBudget = MixtureBudget(), base: str = DEFAULT_MODEL,
                            report: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train and score every system of :data:`SYSTEMS` under ``out`` (resuming finished stages); writes
    ``results.json`` and ``report.md`` there and returns the results."""
    out = Path(out)
    runs = _train_systems(out, budget, base, report)
    loaders = _loaders(out, base)
    systems = []
    for name in SYSTEMS:
        report(f"{name}: scoring")
        scores = run_stage(out / "scores" / name, lambda name=name: _score_system(name, loaders[name], budget), report)
        systems.append({"system": name, "trainable_parameters": runs[name]["trainable_parameters"],
                        "steps": runs[name]["steps"], "gate_parameters": runs[name].get("gate_parameters"),
                        "train_seconds": runs[name].get("seconds"), **scores})
    results = {"budget": asdict(budget), "base": base, "systems": systems}
    save_json(out / "results.json", results)
    (out / "report.md").write_text(mixtures_table(results))
    report(mixtures_table(results))
    return results


def mixtures_table(results: dict[str, Any]) -> str:
    """A markdown table: systems as columns; budget, per-task and composite accuracies as rows."""
    systems = results["systems"]
    tasks = results["budget"]["tasks"]

    def row(label: str, cell: Callable[[dict], str]) -> str:
        return f"| {label} | " + " | ".join(cell(s) for s in systems) + " |"

    def percent(value) -> str:
        return "–" if value is None else f"{value:.0%}"

    def composite(key: str, task: str | None = None) -> Callable[[dict], str]:
        def cell(system: dict) -> str:
            found = system.get("composite")
            return "–" if found is None else percent(found["per_task"].get(task) if task else found[key])
        return cell

    lines = ["| | " + " | ".join(f"`{s['system']}`" for s in systems) + " |",
             "|---|" + "---|" * len(systems),
             row("trainable parameters", lambda s: f"{s['trainable_parameters'] / 1e6:.2f} M"),
             row("optimizer steps (batch 8)", lambda s: str(s["steps"]))]
    lines += [row(f"held-out `{t}`", lambda s, t=t: percent(s["exact_match"][t])) for t in tasks]
    lines.append(row("held-out mean", lambda s: percent(sum(s["exact_match"].values()) / len(tasks))))
    lines += [row(f"composite: `{t}` answers", composite("per_task", t)) for t in tasks]
    lines += [row("composite: all answers", composite("accuracy")),
              row("composite: prompts fully right", composite("all_correct"))]
    return "\n".join(lines) + "\n"
