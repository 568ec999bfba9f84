"""MeteoRA jobs on a named base model: train the gates over task adapters, load, evaluate.

A run directory holds the gates and where the task adapters live (:func:`save_meteora`, so
:func:`lorakit.load` rebuilds the model) and ``meteora_run.json`` (the run's inputs: the adapters' paths
in gate order, the data and the settings).
The training data's ``"task"`` field names, for each example, the adapter its gates should pick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.config import TrainConfig
from lorakit.data.source import load_examples
from lorakit.errors import ConfigError, DataError
from lorakit.eval.composite import CompositeResult, composite_examples, evaluate_composite
from lorakit.eval.exact_match import EvalResult
from lorakit.io.adapters import load_adapter
from lorakit.io.files import save_json
from lorakit.jobs.evaluate import evaluate_on, load_kind
from lorakit.methods.component import WritesResult
from lorakit.mixtures.meteora.config import MeteoraConfig
from lorakit.mixtures.meteora.model import MeteoraModel
from lorakit.mixtures.meteora.storage import METEORA_KIND, save_meteora
from lorakit.mixtures.meteora.task_loss import MeteoraTaskLoss
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train.distributed import barrier
from lorakit.train.loop import TrainResult, train

RUN_FILE = "meteora_run.json"


def _load_adapters(model, adapters: Mapping[str, str | Path], trainable: bool) -> None:
    if not adapters:
        raise ConfigError("MeteoRA needs at least one task adapter (NAME=DIR)")
    for name, path in adapters.items():
        load_adapter(model, path, name, activate=False, trainable=trainable)


def train_meteora(data: str, out: str | Path, adapters: Mapping[str, str | Path], *, base: str = DEFAULT_MODEL,
                  meteora: MeteoraConfig = MeteoraConfig(), config: TrainConfig = TrainConfig(),
                  n: int | None = None, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train MeteoRA gates (and, with ``train_adapters``, the adapters) over ``adapters`` (task name ->
    PEFT adapter directory) on ``data``, whose examples name their task in ``"task"``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass overwrite or choose another directory")
    barrier()  # every rank has checked the directory before rank 0 writes into it
    examples = load_examples(data, split="train", n=n)
    unknown = sorted({e.task for e in examples if e.task is not None} - set(adapters))
    if unknown or all(e.task is None for e in examples):
        raise DataError(f"{data}: MeteoRA trains its gates from each example's \"task\", which must name one of "
                        f"the adapters {sorted(adapters)}; " + (f"unknown: {unknown}" if unknown else "none has one"))
    model, tokenizer = load_model(base)
    _load_adapters(model, adapters, trainable=meteora.train_adapters)
    torch.manual_seed(config.seed)
    xmodel = MeteoraModel(model, list(adapters), meteora)
    paths = [[name, str(Path(path).resolve())] for name, path in adapters.items()]  # a list keeps gate order

    def save(directory: Path) -> None:
        save_json(directory / RUN_FILE, {"adapters": paths, "data": data, "base": base, "n": n,
                                         "config": dataclasses.asdict(config)})
        save_meteora(xmodel, directory, adapter_paths=adapters)

    return train(xmodel, tokenizer, examples, config, out_dir=out, overwrite=True, progress=progress,
                 components=[MeteoraTaskLoss(xmodel), WritesResult(save)])


def load_meteora_model(path: str | Path, *, base: str | None = None) -> tuple[MeteoraModel, Any]:
    """The MeteoRA model saved at ``path`` (through :func:`lorakit.load`: its task adapters as recorded) on
    ``base`` (None: the base it records), in eval mode; another kind of directory is refused by name."""
    loaded, tokenizer = load_kind(path, base, METEORA_KIND)
    return loaded.model, tokenizer


def evaluate_meteora(path: str | Path, data: str, *, base: str | None = None, split: str = "test",
                     n: int | None = None, batch_size: int = 16, progress: bool = False) -> EvalResult:
    """Exact match and loss of the MeteoRA model at ``path`` on ``data``."""
    xmodel, tokenizer = load_meteora_model(path, base=base)
    return evaluate_on(xmodel, tokenizer, data, split=split, n=n, batch_size=batch_size, progress=progress)


def evaluate_meteora_composite(path: str | Path, tasks: list[str], *, base: str | None = None, per_prompt: int = 2,
                               n: int = 50, batch_size: int = 16) -> CompositeResult:
    """The MeteoRA model at ``path`` on ``n`` composite prompts of ``per_prompt`` questions from ``tasks``,
    each answer scored with its own task's metric (:mod:`lorakit.eval.composite`)."""
    xmodel, tokenizer = load_meteora_model(path, base=base)
    return evaluate_composite(xmodel, tokenizer, composite_examples(tasks, per_prompt=per_prompt, count=n),
                              batch_size=batch_size)
