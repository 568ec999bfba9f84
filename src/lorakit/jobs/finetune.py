"""``lorakit train``: fine-tune a LoRA adapter (or the full model), several adapters in one batch, or resume a run.

The base is ``"smollm2-135m"`` by default, or any local directory or hub id; the run's settings go to
``out/run.json`` so that :func:`resume_finetune` continues it with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lorakit.config import (
    DATA_DRIVEN_INITS,
    QUANTIZING_INITS,
    LoraConfig,
    LoramConfig,
    QuantizedInitConfig,
    TrainConfig,
)
from lorakit.core.lifecycle import attach
from lorakit.data.source import load_examples
from lorakit.errors import ConfigError
from lorakit.io.files import save_json
from lorakit.models import DEFAULT_MODEL
from lorakit.parallel.process_group import current_ranks
from lorakit.quant.base_schemes import base_scheme
from lorakit.quant.quantized_adapter import QUANTIZED_BASES_FILE
from lorakit.quant.quantized_files import load_quantized
from lorakit.quant.quantized_loading import load_base, load_with_quantized_linears
from lorakit.train.chunked import check_chunkwise
from lorakit.train.combinations import check_combination, prepared_lora
from lorakit.train.components import check_components, components_for
from lorakit.train.distributed import barrier
from lorakit.train.loop import TrainResult, train
from lorakit.train.loram_base import check_loram, prune_for_loram
from lorakit.train.prepare import PreparedAdapter, prepare_adapter
from lorakit.train.sharding import load_skeleton, shard_and_fill

RUN_FILE = "run.json"


def _lora_from_dict(run: dict[str, Any]) -> LoraConfig:
    """The ``LoraConfig`` a ``run.json`` records. Runs of lorakit 0.1 named the init apart (``"init"``) and
    recorded ``LoraConfig.init`` as ``"default"``: that init is the config's now."""
    values = dict(run["lora"])
    if values.get("init") == "default":
        values["init"] = run.get("init", "kaiming")
    targets, exclude = values["targets"], values.get("exclude")
    return LoraConfig(**{**values, "targets": tuple(targets) if isinstance(targets, list) else targets,
                         "exclude": tuple(exclude) if isinstance(exclude, list) else exclude})


def finetune(data: str, out: str | Path, *, base: str = DEFAULT_MODEL, lora: LoraConfig = LoraConfig(),
             config: TrainConfig = TrainConfig(), n: int | None = None, eval_data: str | None = None,
             eval_n: int | None = 64, overwrite: bool = False, progress: bool = True,
             resume: bool = False, quantized_init: QuantizedInitConfig = QuantizedInitConfig(),
             quantize: str | None = None, loram: LoramConfig = LoramConfig()) -> TrainResult:
    """Train a LoRA adapter (or the full model with ``config.full``) on ``data`` and write it to ``out``.

    With ``quantize`` (``"nf4"``, ``"int8"``: :mod:`lorakit.quant.base_schemes`) the base is quantized as it
    loads (QLoRA) and the adapter records it, so that loading it rebuilds that base.

    ``data`` is a JSONL file or ``task:NAME`` (``n`` examples of that task's train split); ``lora.init``
    may be a data-driven init (:func:`lorakit.train.prepare.prepare_adapter`; ``quantized_init`` shapes
    ``lq-lora`` and ``loftq``). The run's settings go to
    ``out/run.json`` so that :func:`resume_finetune` can continue it.

    With ``loram.ratio`` set (LoRAM) the base is pruned (and aligned, and quantized under ``quantize``) before the
    adapter attaches, and the adapter written is recovered for the full base
    (:func:`lorakit.train.loram_base.prune_for_loram`).
    """
    out = Path(out)
    check_components(config)
    check_combination(lora, config)
    check_chunkwise(config, components_for(config))
    lora = prepared_lora(lora, config)
    examples = load_examples(data, split="train", n=n)
    eval_examples = load_examples(eval_data, split="test", n=eval_n) if eval_data else None
    check_quantize(quantize, lora, config)
    check_loram(loram, lora, config, quantize)
    if not resume:
        check_fresh(out, overwrite)
    barrier()  # every rank has checked the directory before rank 0 writes into it
    model, tokenizer, files = _run_base(base, out, lora=lora, config=config, loram=loram, quantize=quantize,
                                        resume=resume, progress=progress)
    extra = []
    if loram.enabled:
        extra.append(prune_for_loram(model, tokenizer, examples, loram, config, quantize=quantize, run_dir=out,
                                     resume=resume, progress=progress))
    torch.manual_seed(config.seed)
    prepared = PreparedAdapter(lora)
    if not config.full:
        prepared = prepare_adapter(model, tokenizer, examples, lora, config, run_dir=out, resume=resume,
                                   quantized_init=quantized_init)
    if files is not None:
        shard_and_fill(model, files)
    if not resume and current_ranks().main:
        save_json(out / RUN_FILE, dict(base=base, data=data, n=n, eval_data=eval_data, eval_n=eval_n,
                                       lora=dataclasses.asdict(prepared.lora), config=dataclasses.asdict(config),
                                       quantized_init=dataclasses.asdict(quantized_init), quantize=quantize,
                                       loram=dataclasses.asdict(loram)))
    if prepared.moves_base and config.regularizer == "ba-lora" and "ba_lora_reference" not in config.options:
        # LoRA-GA moved the base: BA-LoRA compares with the model as it starts (offset base + initial adapter).
        config = dataclasses.replace(config, options={**config.options, "ba_lora_reference": "snapshot"})
    # The directory was checked above and now holds this run's own files, which train() must not refuse.
    return train(model, tokenizer, examples, config, components=[*prepared.components, *extra], out_dir=out,
                 eval_examples=eval_examples, resume=out if resume else None, overwrite=True, progress=progress)


def _run_base(base: str, out: Path, *, lora: LoraConfig, config: TrainConfig, loram: LoramConfig,
              quantize: str | None, resume: bool, progress: bool) -> tuple[Any, Any, Any]:
    """The model and tokenizer a :func:`finetune` run starts from, and the checkpoint files each rank fills its
    shards from after sharding (None unless the base loads as an FSDP skeleton)."""
    if config.fsdp and not config.full and lora.init not in DATA_DRIVEN_INITS:  # no rank holds the whole base
        return load_skeleton(base)
    if resume and lora.init in QUANTIZING_INITS:  # the saved Q put in place as the base loads: never the fp32 model
        model, tokenizer = load_with_quantized_linears(base, load_quantized(out / QUANTIZED_BASES_FILE),
                                                       progress=progress)
    else:  # LoRAM prunes the full-precision base, then quantizes what is left
        model, tokenizer = load_base(base, None if loram.enabled else quantize, progress=progress)
    return model, tokenizer, None


def finetune_adapters(datasets: dict[str, str], out: str | Path, *, base: str = DEFAULT_MODEL,
                      lora: LoraConfig = LoraConfig(), config: TrainConfig = TrainConfig(), n: int | None = None,
                      overwrite: bool = False, progress: bool = True, resume: bool = False,
                      quantize: str | None = None) -> TrainResult:
    """Train one adapter per ``name -> data`` pair in shared batches (:func:`lorakit.train.multi.train_adapters`);
    adapter ``name`` goes to ``out/name``, the run's settings to ``out/run.json``; ``quantize`` as
    :func:`finetune`'s."""
    from lorakit.train.multi import check_multi_config, train_adapters
    out = Path(out)
    check_multi_config(config)
    if config.fsdp:
        raise ConfigError("--fsdp trains one adapter: FSDP2 gives an adapter that no row of a step reaches a zero "
                          "gradient, and AdamW would still move it; train several adapters data-parallel instead")
    check_quantize(quantize, lora, config)
    examples = {name: load_examples(data, split="train", n=n) for name, data in datasets.items()}
    if not resume:
        check_fresh(out, overwrite)
    barrier()
    model, tokenizer = load_base(base, quantize, progress=progress)
    torch.manual_seed(config.seed)
    for name in datasets:
        attach(model, lora, name, activate=False)
    if not resume and current_ranks().main:
        save_json(out / RUN_FILE, dict(base=base, datasets=datasets, n=n, lora=dataclasses.asdict(lora),
                                       config=dataclasses.asdict(config), quantize=quantize))
    return train_adapters(model, tokenizer, examples, config, out_dir=out, resume=out if resume else None,
                          overwrite=True, progress=progress)


def check_quantize(quantize: str | None, lora: LoraConfig, config: TrainConfig) -> None:
    """Refuse ``quantize`` where it makes no sense: an unknown scheme, full fine-tuning, an init or a method that
    quantizes."""
    if quantize is None:
        return
    base_scheme(quantize)
    if config.full:
        raise ConfigError(f"--quantize {quantize} freezes the base in quantized form, so --full has nothing to "
                          "train; drop one of them")
    if lora.init in QUANTIZING_INITS:
        raise ConfigError(f"--init {lora.init} quantizes the base itself (its own bits); drop --quantize {quantize}")
    if config.method == "l4q":
        raise ConfigError(f"--method l4q quantizes W0 + s B A itself (--option l4q_bits); drop --quantize {quantize}")
    if config.method == "pat":
        raise ConfigError(f"--method pat folds its modules into the dense base weights and cuts them; drop --quantize "
                          f"{quantize}")
    if config.fsdp:
        raise ConfigError(f"--fsdp shards parameters, and --quantize {quantize} keeps the base as quantized codes, "
                          "which FSDP2 does not shard; each rank holds its own quantized copy without --fsdp")


def check_fresh(out: Path, overwrite: bool) -> None:
    """Refuse to start a run in a non-empty ``out`` unless ``overwrite``."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --resume {out} to continue its run, --overwrite, "
                          "or another --out")


def resume_finetune(run_dir: str | Path, *, progress: bool = True, grad_accum: int | None = None) -> TrainResult:
    """Continue the interrupted run in ``run_dir`` from its newest checkpoint, with its own settings; ``grad_accum``
    replaces the run's where it resumes on another number of ranks with the same global batch."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_FILE}; it is not a lorakit training run")
    args = json.loads(path.read_text())
    if grad_accum is not None:
        args["config"]["grad_accum"] = grad_accum
    if "datasets" in args:
        return finetune_adapters(args["datasets"], run_dir, base=args["base"], lora=_lora_from_dict(args),
                                 config=TrainConfig(**args["config"]), n=args["n"], progress=progress, resume=True,
                                 quantize=args.get("quantize"))
    return finetune(args["data"], run_dir, base=args["base"], lora=_lora_from_dict(args),
                    config=TrainConfig(**args["config"]), n=args["n"], eval_data=args["eval_data"],
                    eval_n=args["eval_n"], progress=progress, resume=True,
                    quantized_init=QuantizedInitConfig(**args.get("quantized_init", {})),
                    quantize=args.get("quantize"), loram=LoramConfig(**args.get("loram", {})))
