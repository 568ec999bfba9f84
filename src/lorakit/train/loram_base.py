"""The pruned base of a LoRAM run: rank the structures, cut them, align, quantize (QLoRAM), and the component
that saves the recovered adapter (Zhang et al., ICLR'25, arXiv 2502.13533).

The prune map goes to the run directory's ``loram.json`` before training starts; a resumed run cuts the base by
that map (the importance is not estimated again) and, with alignment, aligns again from the same seed. The full
model is loaded to be pruned, so the process's peak resident memory up to here is the full model's; it is
recorded in ``loram.json`` (``preparation_peak_mib``), the freed memory returned to the system and the peak reset
(Linux), so that the run's ``peak_memory_mib`` measures training on the pruned model, as when a publisher ships
the pruned model.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig, LoramConfig, TrainConfig
from lorakit.data.example import Example
from lorakit.data.offline_corpus import english_corpus
from lorakit.errors import ConfigError
from lorakit.io.files import load_json, save_json
from lorakit.parallel.process_group import current_ranks
from lorakit.pruning.alignment import align_pruned
from lorakit.pruning.importance import gradient_scores, magnitude_scores, random_scores
from lorakit.pruning.loram_training import LORAM_FILE, LoramRecovery
from lorakit.pruning.structured import PruneMap, apply_pruning, plan_pruning, pruned_block_indices
from lorakit.quant.base_schemes import base_scheme
from lorakit.quant.model_quantization import quantizable_linears, replace_module
from lorakit.train.allocator import return_freed_memory
from lorakit.train.peak_memory import peak_resident_mib, reset_peak
from lorakit.train.prepare import estimation_batches

LORAM_METHODS = ("lora", "dylora", "codyra")
"""Methods whose adapter is plain (A, B) pairs at the end, which recovery puts back at full shape."""
LORAM_REFUSED_INITS = ("lora-ga", "lq-lora", "loftq")
"""Inits that change the base weights: the full model the recovered adapter goes on would not have the change."""


def check_loram(loram: LoramConfig, lora: LoraConfig, config: TrainConfig, quantize: str | None) -> None:
    """Refuse what LoRAM cannot do, before anything is loaded or written."""
    if not loram.enabled:
        return
    if config.full:
        raise ConfigError("--loram-ratio trains an adapter on the pruned model; --full trains every weight: drop one")
    if config.fsdp:
        raise ConfigError("--loram-ratio prunes the whole base in one process before training; drop --fsdp (the "
                          "pruned model is what makes it fit)")
    if config.method not in LORAM_METHODS:
        raise ConfigError(f"--loram-ratio recovers plain LoRA factors; --method {config.method} is not one of "
                          f"{', '.join(LORAM_METHODS)}")
    if lora.init in LORAM_REFUSED_INITS:
        raise ConfigError(f"--init {lora.init} changes the base weights of the pruned model, which the full model the "
                          "adapter is recovered for would not have; use kaiming, gaussian, zeros or eva")
    if quantize is not None and base_scheme(quantize).quantize is None:
        raise ConfigError(f"--quantize {quantize} is applied by transformers as the model loads, before LoRAM prunes "
                          "it; use --quantize nf4 or int8 with --loram-ratio")
    if loram.align_steps and current_ranks().distributed:
        raise ConfigError("--loram-align-steps trains every weight of the pruned model in one process; align in a "
                          "single-process run (the alignment is the model publisher's one-off step)")


def _scores(model: nn.Module, tokenizer, examples: Sequence[Example], loram: LoramConfig, config: TrainConfig,
            blocks: list[int], progress: bool):
    if loram.importance == "random":
        return random_scores(model, blocks, config.seed)
    if loram.importance == "magnitude":
        return magnitude_scores(model, blocks)
    batches = estimation_batches(tokenizer, examples, config, count=loram.importance_batches)
    return gradient_scores(model, blocks, batches, progress=progress)


def _quantize_linears(model: nn.Module, scheme_name: str) -> None:
    """QLoRAM: every quantizable linear of the pruned model replaced under ``scheme_name`` (frozen)."""
    scheme = base_scheme(scheme_name)
    for name in quantizable_linears(model):
        linear = model.get_submodule(name)
        replace_module(model, name, scheme.quantize(linear.weight.detach(), linear.bias))


def _own_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer into memory of its own: the loaded checkpoint's tensors may still view its
    memory-mapped file, whose pages (the pruned weights' included) stay resident while any tensor maps them."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_for_loram(model: nn.Module, tokenizer, examples: Sequence[Example], loram: LoramConfig,
                    config: TrainConfig, *, quantize: str | None, run_dir: Path, resume: bool,
                    progress: bool = False) -> LoramRecovery:
    """Cut ``model`` (full precision, no adapter yet) in place as ``loram`` says (module docstring) and return the
    component that saves the recovered adapter."""
    saved = run_dir / LORAM_FILE
    full_parameters = _parameters(model)
    if resume and saved.is_file():
        prune_map = PruneMap.from_json(load_json(saved), str(saved))
    else:
        blocks = pruned_block_indices(model, loram.keep_first, loram.keep_last)
        prune_map = plan_pruning(model, _scores(model, tokenizer, examples, loram, config, blocks, progress),
                                 loram.ratio)
    apply_pruning(model, prune_map)
    _own_memory(model)
    alignment = []
    if loram.align_steps:
        torch.manual_seed(config.seed)
        alignment = align_pruned(model, tokenizer, english_corpus(), steps=loram.align_steps, lr=loram.align_lr,
                                 window=min(256, config.max_length), progress=progress)
    pruned_parameters = _parameters(model)
    if quantize is not None:
        _quantize_linears(model, quantize)
    model.requires_grad_(False)
    gc.collect()
    return_freed_memory()
    record = {**prune_map.summary(full_parameters, pruned_parameters), "ratio": loram.ratio,
              "importance": loram.importance, "align_steps": loram.align_steps, "alignment_losses": alignment,
              "preparation_peak_mib": peak_resident_mib(), "peak_reset": reset_peak()}
    if not resume and current_ranks().main:
        save_json(saved, record)
    return LoramRecovery(prune_map, recover=loram.recover, seed=config.seed)
