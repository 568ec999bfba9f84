"""End-to-end jobs on a named base model: fine-tune, evaluate, generate, merge, inspect.

Each function here is what one CLI subcommand calls; they load the base (``"smollm2-135m"`` by
default, or any local directory or hub id), attach or load adapters, and delegate to the library.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lorakit.config import LoraConfig, TrainConfig
from lorakit.core.inject import TargetPlan, plan
from lorakit.core.lifecycle import attach
from lorakit.core.merge import merge_and_unload
from lorakit.data.source import load_examples
from lorakit.errors import ConfigError
from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.train.prepare import PreparedAdapter, prepare_adapter
from lorakit.eval.generate import generate
from lorakit.io.adapters import load_adapter, read_adapter
from lorakit.io.files import save_json
from lorakit.jobs.continual import ContinualResult
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train.components import check_components
from lorakit.train.combinations import check_combination, prepared_lora
from lorakit.train.loop import TrainResult, train

RUN_FILE = "run.json"


def _lora_from_dict(values: dict[str, Any]) -> LoraConfig:
    targets = values["targets"]
    return LoraConfig(**{**values, "targets": tuple(targets) if isinstance(targets, list) else targets,
                         "exclude": tuple(values["exclude"]) if isinstance(values.get("exclude"), list)
                         else values.get("exclude")})


def finetune(data: str, out: str | Path, *, base: str = DEFAULT_MODEL, lora: LoraConfig = LoraConfig(),
             config: TrainConfig = TrainConfig(), n: int | None = None, eval_data: str | None = None,
             eval_n: int | None = 64, init: str = "kaiming", overwrite: bool = False, progress: bool = True,
             resume: bool = False) -> TrainResult:
    """Train a LoRA adapter (or the full model with ``config.full``) on ``data`` and write it to ``out``.

    ``data`` is a JSONL file or ``task:NAME`` (``n`` examples of that task's train split); ``init`` is
    one of :data:`lorakit.train.prepare.INITS`. The run's settings go to ``out/run.json`` so that
    :func:`resume_finetune` can continue it.
    """
    out = Path(out)
    check_components(config)
    check_combination(init, lora, config)
    lora = prepared_lora(lora, config)
    examples = load_examples(data, split="train", n=n)
    eval_examples = load_examples(eval_data, split="test", n=eval_n) if eval_data else None
    if not resume:
        _check_fresh(out, overwrite)
    model, tokenizer = load_model(base)
    torch.manual_seed(config.seed)
    prepared = PreparedAdapter(lora)
    if not config.full:
        prepared = prepare_adapter(model, tokenizer, examples, lora, config, init, run_dir=out, resume=resume)
    if not resume:
        save_json(out / RUN_FILE, dict(base=base, data=data, n=n, eval_data=eval_data, eval_n=eval_n, init=init,
                                       lora=dataclasses.asdict(prepared.lora), config=dataclasses.asdict(config)))
    # The base weights move under LoRA-GA and full fine-tuning: a regularizer compares with a fresh copy.
    moved_base = config.full or init == "lora-ga"
    reference = load_model(base)[0] if config.regularizer is not None and moved_base else None
    # The directory was checked above and now holds this run's own files, which train() must not refuse.
    return train(model, tokenizer, examples, config, out_dir=out, eval_examples=eval_examples,
                 resume=out if resume else None, overwrite=True, progress=progress, save=prepared.save,
                 reference=reference)


def finetune_adapters(datasets: dict[str, str], out: str | Path, *, base: str = DEFAULT_MODEL,
                      lora: LoraConfig = LoraConfig(), config: TrainConfig = TrainConfig(), n: int | None = None,
                      overwrite: bool = False, progress: bool = True, resume: bool = False) -> TrainResult:
    """Train one adapter per ``name -> data`` pair in shared batches (:func:`lorakit.train.multi.train_adapters`);
    adapter ``name`` goes to ``out/name``, the run's settings to ``out/run.json``."""
    from lorakit.train.multi import check_multi_config, train_adapters
    out = Path(out)
    check_multi_config(config)
    examples = {name: load_examples(data, split="train", n=n) for name, data in datasets.items()}
    if not resume:
        _check_fresh(out, overwrite)
    model, tokenizer = load_model(base)
    torch.manual_seed(config.seed)
    for name in datasets:
        attach(model, lora, name, activate=False)
    if not resume:
        save_json(out / RUN_FILE, dict(base=base, datasets=datasets, n=n, lora=dataclasses.asdict(lora),
                                       config=dataclasses.asdict(config)))
    return train_adapters(model, tokenizer, examples, config, out_dir=out, resume=out if resume else None,
                          overwrite=True, progress=progress)


def _check_fresh(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --resume {out} to continue its run, --overwrite, "
                          "or another --out")


def resume_finetune(run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Continue the interrupted run in ``run_dir`` from its newest checkpoint, with its own settings."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_FILE}; it is not a lorakit training run")
    args = json.loads(path.read_text())
    if "datasets" in args:
        return finetune_adapters(args["datasets"], run_dir, base=args["base"], lora=_lora_from_dict(args["lora"]),
                                 config=TrainConfig(**args["config"]), n=args["n"], progress=progress, resume=True)
    return finetune(args["data"], run_dir, base=args["base"], lora=_lora_from_dict(args["lora"]),
                    config=TrainConfig(**args["config"]), n=args["n"], eval_data=args["eval_data"],
                    eval_n=args["eval_n"], init=args.get("init", "kaiming"), progress=progress, resume=True)


def continual_finetune(tasks: list[str], out: str | Path, *, base: str = DEFAULT_MODEL, lora: LoraConfig = LoraConfig(),
                       config: TrainConfig = TrainConfig(), n: int | None = None, eval_n: int = 50,
                       progress: bool = True) -> ContinualResult:
    """Train built-in ``tasks`` in order (:func:`lorakit.jobs.continual.train_continual`), score each
    task's held-out split after each, and write ``out/continual.json``."""
    from lorakit.jobs.continual import train_continual
    out = Path(out)
    _check_fresh(out, overwrite=False)
    model, tokenizer = load_model(base)
    torch.manual_seed(config.seed)
    sequence = [(task, load_examples(f"task:{task}", split="train", n=n)) for task in tasks]
    eval_sets = {task: load_examples(f"task:{task}", split="test", n=eval_n) for task in tasks}
    result = train_continual(model, tokenizer, sequence, lora, config, eval_sets=eval_sets, out_dir=out,
                             progress=progress)
    save_json(out / "continual.json", result.to_dict())
    return result


def model_with_adapter(base: str, adapter: str | Path | None):
    """The base model with ``adapter``: a PEFT-format adapter, or a MixLoRA directory."""
    model, tokenizer = load_model(base)
    if adapter is not None and (Path(adapter) / "mixlora_config.json").is_file():
        from lorakit.mixtures.mixlora import load_mixlora
        load_mixlora(model, adapter)
    elif adapter is not None:
        load_adapter(model, adapter)
    return model, tokenizer


def evaluate_adapter(data: str, *, base: str = DEFAULT_MODEL, adapter: str | Path | None = None,
                     split: str = "test", n: int | None = None, batch_size: int = 16,
                     progress: bool = False) -> EvalResult:
    """Exact match, loss and perplexity of the base model, or of it with ``adapter``, on ``data``."""
    examples = load_examples(data, split=split, n=n)
    model, tokenizer = model_with_adapter(base, adapter)
    return evaluate(model, tokenizer, examples, batch_size=batch_size, progress=progress)


def complete(prompts: list[str], *, base: str = DEFAULT_MODEL, adapter: str | Path | None = None,
             **options: Any) -> list[str]:
    """Generate a completion of each prompt with the base model, or with ``adapter``."""
    model, tokenizer = model_with_adapter(base, adapter)
    return generate(model, tokenizer, prompts, **options)


def merge_into_model(adapter: str | Path, out: str | Path, *, base: str = DEFAULT_MODEL) -> Path:
    """Write ``base`` with ``adapter`` merged into its weights (safetensors, with the tokenizer) to ``out``."""
    model, tokenizer = model_with_adapter(base, adapter)
    merged = merge_and_unload(model)
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """What an adapter directory holds: its config, modules, ranks, parameter count and tensor norms."""
    config, raw, tensors = read_adapter(path)
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in sorted(tensors.items()):
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        entry = modules.setdefault(module, {})
        side = "A" if part.startswith(("A", "embedding_A")) else "B"
        entry[f"{side}_shape"] = list(tensor.shape)
        entry[f"{side}_norm"] = float(tensor.float().norm())
    for module, entry in modules.items():
        entry["rank"] = entry["A_shape"][0]
        entry["scale"] = config.scale_for(module)
    return {"path": str(path), "base_model": raw.get("base_model_name_or_path"), "rank": config.rank,
            "alpha": config.alpha, "use_rslora": config.use_rslora, "target_modules": raw.get("target_modules"),
            "parameters": sum(t.numel() for t in tensors.values()), "modules": modules}


def list_targets(lora: LoraConfig, *, base: str = DEFAULT_MODEL) -> list[TargetPlan]:
    """The dry run on a named base model: which modules ``lora`` would wrap, with ranks and scales."""
    model, _ = load_model(base)
    return plan(model, lora)
