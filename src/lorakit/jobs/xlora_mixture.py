"""X-LoRA jobs on a named base model: train the classifier, load, evaluate, generate."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.config import TrainConfig
from lorakit.data.source import load_examples
from lorakit.errors import ConfigError
from lorakit.eval.exact_match import EvalResult
from lorakit.eval.generate import generate
from lorakit.io.adapters import load_adapter
from lorakit.io.files import save_json
from lorakit.jobs.evaluate import evaluate_on, load_kind
from lorakit.methods.component import WritesResult
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.model import XLoraModel
from lorakit.mixtures.xlora.storage import XLORA_KIND, save_xlora
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.parallel.process_group import current_ranks
from lorakit.train.distributed import barrier
from lorakit.train.loop import TrainResult, train

RUN_FILE = "xlora_run.json"


def build_xlora(experts: Mapping[str, str | Path], *, base: str = DEFAULT_MODEL,
                config: XLoraConfig = XLoraConfig(), seed: int = 0) -> tuple[XLoraModel, Any]:
    """Load ``base``, load each expert (name -> PEFT adapter directory) and add a fresh classifier."""
    if not experts:
        raise ConfigError("X-LoRA needs at least one expert (NAME=DIR)")
    model, tokenizer = load_model(base)
    for name, path in experts.items():
        load_adapter(model, path, name, activate=False, trainable=config.trainable_experts)
    torch.manual_seed(seed)
    return XLoraModel(model, list(experts), config), tokenizer


def train_xlora(data: str, out: str | Path, experts: Mapping[str, str | Path], *, base: str = DEFAULT_MODEL,
                xlora: XLoraConfig = XLoraConfig(), config: TrainConfig = TrainConfig(), n: int | None = None,
                eval_data: str | None = None, bundle: bool = False, overwrite: bool = False,
                progress: bool = True, resume: bool = False) -> TrainResult:
    """Train an X-LoRA classifier (and, if configured, the experts) over ``experts`` on ``data``."""
    out = Path(out)
    examples = load_examples(data, split="train", n=n)
    eval_examples = load_examples(eval_data, split="test", n=64) if eval_data else None
    model, tokenizer = build_xlora(experts, base=base, config=xlora, seed=config.seed)
    if not resume and out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; resume its run, pass overwrite, or choose another directory")
    barrier()  # every rank has checked the directory before rank 0 writes into it
    if not resume and current_ranks().main:
        save_json(out / RUN_FILE, {"data": data, "experts": [[k, str(Path(v).resolve())] for k, v in experts.items()],
                                   "base": base, "xlora": dataclasses.asdict(xlora),
                                   "config": dataclasses.asdict(config), "n": n, "eval_data": eval_data,
                                   "bundle": bundle})
    return train(model, tokenizer, examples, config, out_dir=out, eval_examples=eval_examples,
                 resume=out if resume else None, overwrite=True, progress=progress,
                 components=[WritesResult(lambda directory: save_xlora(model, directory, experts, bundle=bundle))])


def resume_xlora(run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Continue the interrupted X-LoRA run in ``run_dir`` with its own settings."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_FILE}; it is not a lorakit X-LoRA training run")
    args = json.loads(path.read_text())
    experts = dict(args["experts"])  # stored as a list of pairs: JSON objects are written with sorted keys
    return train_xlora(args["data"], run_dir, experts, base=args["base"], xlora=XLoraConfig(**args["xlora"]),
                       config=TrainConfig(**args["config"]), n=args["n"], eval_data=args["eval_data"],
                       bundle=args["bundle"], progress=progress, resume=True)


def load_xlora_model(path: str | Path, *, base: str | None = None) -> tuple[XLoraModel, Any]:
    """The saved X-LoRA model at ``path`` (through :func:`lorakit.load`) on ``base`` (None: the base it
    records), with the tokenizer, in eval mode; another kind of directory is refused by name."""
    loaded, tokenizer = load_kind(path, base, XLORA_KIND)
    return loaded.model, tokenizer


def evaluate_xlora(path: str | Path, data: str, *, base: str | None = None, split: str = "test",
                   n: int | None = None, batch_size: int = 16, progress: bool = False) -> EvalResult:
    """Exact match, loss and perplexity of the saved X-LoRA model on ``data``."""
    xmodel, tokenizer = load_xlora_model(path, base=base)
    return evaluate_on(xmodel, tokenizer, data, split=split, n=n, batch_size=batch_size, progress=progress)


def generate_xlora(path: str | Path, prompts: list[str], *, base: str | None = None,
                   reuse_prompt_scalings: bool = False, **options: Any) -> list[str]:
    """Completions from the saved X-LoRA model (both passes cached; optionally one pass per new token)."""
    xmodel, tokenizer = load_xlora_model(path, base=base)
    return generate(xmodel, tokenizer, prompts, model_options={"reuse_prompt_scalings": reuse_prompt_scalings},
                    **options)
