"""Continual learning over a sequence of tasks, CoDyRA's protocol (Lu et al., arXiv 2412.01004).

For each task in turn: attach a fresh adapter, train it (with ``method="codyra"`` its gates sparsify
and it is pruned to rank ``|w|_0`` per module), save it, merge it into the base weights, then score
every task. The result is the accuracy table ``acc[i][j]`` (task ``j`` after training task ``i``) with
the usual summaries: *transfer* (mean accuracy on tasks not trained yet), *average* (mean of the whole
table) and *last* (mean of the final row). The saved adapters are deltas on the weights as they were
when each task started, so the final model is the original base plus *all* of them at weight 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean

import torch
from torch import nn

from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.lifecycle import attach
from lorakit.core.merge import merge_and_unload
from lorakit.data.example import Example
from lorakit.data.source import load_examples
from lorakit.errors import ConfigError
from lorakit.eval.exact_match import evaluate
from lorakit.io.files import save_json
from lorakit.jobs.finetune import check_fresh
from lorakit.methods.codyra import active_ranks
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train.combinations import prepared_lora
from lorakit.train.loop import train


@dataclass
class ContinualResult:
    """What a sequence of tasks did: ``accuracy[i][j]`` is task ``j``'s exact match after task ``i``."""

    tasks: list[str]
    accuracy: list[list[float]]
    ranks: list[dict[str, int]] = field(default_factory=list)
    """Each task's adapter rank per module after training (CoDyRA: the active ranks)."""

    def summary(self) -> dict[str, float]:
        n = len(self.tasks)
        unseen = [self.accuracy[i][j] for j in range(1, n) for i in range(j)]
        return {"transfer": mean(unseen) if unseen else float("nan"),
                "average": mean(value for row in self.accuracy for value in row),
                "last": mean(self.accuracy[-1])}

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "accuracy": self.accuracy, "ranks": self.ranks, **self.summary()}


def train_continual(model: nn.Module, tokenizer, tasks: Sequence[tuple[str, Sequence[Example]]], lora: LoraConfig,
                    config: TrainConfig, *, eval_sets: Mapping[str, Sequence[Example]], out_dir: str | Path,
                    progress: bool = True, eval_batch_size: int = 16) -> ContinualResult:
    """Train ``tasks`` (name, examples) in order on ``model`` as the module docstring says; task ``k``
    trains with seed ``config.seed + k`` and its adapter goes to ``out_dir/<name>``. ``model`` ends with
    every task merged into its weights."""
    names = [name for name, _ in tasks]
    if len(set(names)) != len(names) or set(names) - set(eval_sets):
        raise ConfigError(f"tasks {names} must have distinct names, each with an evaluation set "
                          f"(have: {sorted(eval_sets)})")
    lora = prepared_lora(lora, config)
    result = ContinualResult(names, [])
    for index, (name, examples) in enumerate(tasks):
        attach(model, lora)
        task_config = replace(config, seed=config.seed + index)  # fresh gates and data order per task
        train(model, tokenizer, examples, task_config, out_dir=Path(out_dir) / name, progress=progress)
        result.ranks.append(active_ranks(model))
        merge_and_unload(model)
        result.accuracy.append([evaluate(model, tokenizer, eval_sets[task], batch_size=eval_batch_size).exact_match
                                for task in names])
    return result


def continual_finetune(tasks: list[str], out: str | Path, *, base: str = DEFAULT_MODEL, lora: LoraConfig = LoraConfig(),
                       config: TrainConfig = TrainConfig(), n: int | None = None, eval_n: int = 50,
                       progress: bool = True) -> ContinualResult:
    """Train built-in ``tasks`` in order (:func:`lorakit.jobs.continual.train_continual`), score each
    task's held-out split after each, and write ``out/continual.json``."""
    out = Path(out)
    check_fresh(out, overwrite=False)
    model, tokenizer = load_model(base)
    torch.manual_seed(config.seed)
    sequence = [(task, load_examples(f"task:{task}", split="train", n=n)) for task in tasks]
    eval_sets = {task: load_examples(f"task:{task}", split="test", n=eval_n) for task in tasks}
    result = train_continual(model, tokenizer, sequence, lora, config, eval_sets=eval_sets, out_dir=out,
                             progress=progress)
    save_json(out / "continual.json", result.to_dict())
    return result
