"""Attaching the adapter a training run starts from, with the chosen initialisation.

``LoraConfig.init`` names the init (:data:`lorakit.config.INITS`): ``kaiming`` (the default), ``gaussian``
and ``zeros`` are attached as they are. The data-driven inits run their estimate on the first training
batches before the adapter exists, attach it Kaiming-initialised, then overwrite its factors:

* ``lora-ga`` (Wang et al. 2024): ``grads = estimate_gradients(...)``, attach, ``init_lora_ga``; the
  base weights move by ``-s B0 A0``, so the run saves the rank-2r adapter that reproduces the trained
  model on the *original* base (the :class:`LoraGaExport` component), and keeps
  ``lora_ga_init.safetensors`` so that a resumed run starts from the same ``(A0, B0)`` and offset.
With ``TrainConfig(method="mixlora")`` the model becomes a MixLoRA model instead
(:func:`lorakit.mixtures.mixlora.attach_mixlora`); the method's component saves it.

* ``eva`` (Paischer et al. 2024): ``estimate = estimate_eva(...)``, attach with the redistributed ranks
  (``eva_config``), ``init_eva``; the run records that config, so resuming attaches the same shapes.

* ``lq-lora`` (Guo et al., ICLR 2024) and ``loftq`` (Li et al., ICLR 2024): attach, then ``init_lq_lora``
  (optionally weighted by ``estimate_fisher`` on ``QuantizedInitConfig.fisher_batches`` examples, one per
  batch) or ``init_loftq``; every adapted base becomes an ``NFLinear`` holding ``Q`` and the adapter starts
  at ``L1 L2``. ``Q`` goes to ``quantized_bases.safetensors``, which a resumed run quantizes its bases from;
  the saved adapter belongs to that quantized base.

Under torchrun each rank estimates from its share of those batches (``Ranks.share``) and the estimates combine the
shares (LoRA-GA's and the Fisher's sums added over the ranks, EVA's layer inputs gathered), so every rank starts
where one process starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.config import LoraConfig, QuantizedInitConfig, TrainConfig
from lorakit.core.lifecycle import attach
from lorakit.data.batching import Batches
from lorakit.data.encoding import encode, pad_id
from lorakit.data.example import Example
from lorakit.data.formatting import use_chat
from lorakit.errors import DataError
from lorakit.init.eva import estimate_eva, eva_config, init_eva
from lorakit.init.lora_ga import LoraGaInit, estimate_gradients, init_lora_ga, save_lora_ga_adapter, start_from
from lorakit.init.lq_lora import CONFIG_GRIDS, estimate_fisher, init_loftq, init_lq_lora
from lorakit.methods.component import TrainingComponent
from lorakit.mixtures.mixlora import MixLoraConfig, attach_mixlora
from lorakit.parallel.process_group import current_ranks
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_adapter import QUANTIZED_BASES_FILE, quantize_bases, save_quantized_adapter
from lorakit.quant.quantized_files import load_quantized, save_quantized
from lorakit.quant.quantized_tensor import NFTensor
from lorakit.train.components import method_options

LORA_GA_FILE = "lora_ga_init.safetensors"
ESTIMATE_BATCHES = 8
"""Training batches the data-driven inits estimate from (LoRA-GA's gradients, EVA's activations)."""


@dataclass
class PreparedAdapter:
    """The adapter a run trains: the config actually attached, the components the run needs because of the
    init (e.g. LoRA-GA's export), and whether the init moved the base weights."""

    lora: LoraConfig
    components: list[TrainingComponent] = field(default_factory=list)
    moves_base: bool = False


class LoraGaExport(TrainingComponent):
    """Saves a LoRA-GA run as the rank-2r adapter that reproduces the trained model on the original base."""

    def __init__(self, start: LoraGaInit) -> None:
        self.start = start

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        save_lora_ga_adapter(model, out_dir, "default", self.start)
        return True


class QuantizedAdapterExport(TrainingComponent):
    """Saves an LQ-LoRA or LoftQ run with the quantized bases its adapter was trained on (a ``quantized-adapter``
    directory: :func:`lorakit.load` rebuilds that model, not the full-precision one)."""

    def __init__(self, quantized: dict[str, NFTensor], init: str) -> None:
        self.quantized, self.init = quantized, init

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        save_quantized_adapter(model, out_dir, self.quantized, origin=f"{self.init} run")
        return True


def estimation_batches(tokenizer, examples: Sequence[Example], config: TrainConfig, *,
                        count: int = ESTIMATE_BATCHES, batch_size: int | None = None) -> list[dict]:
    """This rank's share of the first ``count`` batches of the run's data order (a lone process: all of them); the
    estimates combine the shares over the ranks into what one process computes from every batch. Fewer batches
    than ranks is refused on every rank alike (each rank needs one)."""
    chat = use_chat(tokenizer, config.chat)
    encoded = [encode(e, tokenizer, chat=chat, max_length=config.max_length) for e in examples]
    batches = Batches(encoded, batch_size=batch_size or config.batch_size, pad_id=pad_id(tokenizer), seed=config.seed)
    first = [batch for _, batch in zip(range(count), batches.epoch(0), strict=False)]
    ranks = current_ranks()
    if len(first) < ranks.world:
        raise DataError(f"the {ranks.world} ranks estimate the initialisation from {len(first)} batch(es) of the "
                        f"training data, fewer than one each; use at most {len(first)} ranks, more data, or (for "
                        "LQ-LoRA's Fisher) more --fisher-batches")
    return ranks.share(first)


def prepare_adapter(model: nn.Module, tokenizer, examples: Sequence[Example], lora: LoraConfig,
                    config: TrainConfig, *, run_dir: Path, resume: bool,
                    quantized_init: QuantizedInitConfig = QuantizedInitConfig()) -> PreparedAdapter:
    """Attach adapter ``"default"`` to ``model`` initialised as ``lora.init`` says (one of
    :data:`lorakit.config.INITS`; the data-driven ones estimate from ``examples`` first; ``quantized_init``
    shapes ``lq-lora`` and ``loftq``)."""
    if config.method == "mixlora":
        return _mixlora(model, lora, config)
    if lora.init == "eva":
        return _eva(model, tokenizer, examples, lora, config, resume)
    if lora.init == "lora-ga":
        return _lora_ga(model, tokenizer, examples, lora, config, run_dir, resume)
    if lora.init in ("lq-lora", "loftq"):
        return _quantizing(model, tokenizer, examples, lora, config, quantized_init, run_dir, resume)
    attach(model, lora)
    return PreparedAdapter(lora)


def _placeholder(lora: LoraConfig) -> LoraConfig:
    """The config a data-driven init attaches before it overwrites the factors (Kaiming, as PEFT attaches)."""
    return dataclasses.replace(lora, init="kaiming")


def _lora_ga(model, tokenizer, examples, lora, config, run_dir: Path, resume: bool) -> PreparedAdapter:
    if resume:
        attach(model, _placeholder(lora))
        start = LoraGaInit.load(run_dir / LORA_GA_FILE)
        start_from(model, start)
    else:
        grads = estimate_gradients(model, estimation_batches(tokenizer, examples, config), targets=lora,
                                   progress=current_ranks().main)
        attach(model, _placeholder(lora))
        start = init_lora_ga(model, grads)
        if current_ranks().main:  # every rank computed the same start from the combined estimate; rank 0 keeps it
            start.save(run_dir / LORA_GA_FILE)
    return PreparedAdapter(lora, [LoraGaExport(start)], moves_base=True)


def _quantizing(model, tokenizer, examples, lora, config, settings: QuantizedInitConfig, run_dir: Path,
                resume: bool) -> PreparedAdapter:
    """LQ-LoRA or LoftQ; a resumed run quantizes its bases from the saved Q (the checkpoint holds A and B), unless
    they were loaded with it in place (``lorakit train --resume``: the job reads the base that way)."""
    if resume:
        attach(model, _placeholder(lora))
        quantized = load_quantized(run_dir / QUANTIZED_BASES_FILE)
        quantize_bases(model, {name: weight for name, weight in quantized.items()
                               if not isinstance(model.get_submodule(name).base_layer, NFLinear)})
        return PreparedAdapter(lora, [QuantizedAdapterExport(quantized, lora.init)], moves_base=True)
    fisher = None
    if lora.init == "lq-lora" and settings.fisher_batches:
        batches = estimation_batches(tokenizer, examples, config, count=settings.fisher_batches, batch_size=1)
        fisher = estimate_fisher(model, batches, targets=lora, progress=current_ranks().main)
    attach(model, _placeholder(lora))
    if lora.init == "lq-lora":
        decompositions = init_lq_lora(model, budget=settings.bits, grid=CONFIG_GRIDS[settings.grid], fisher=fisher,
                                      max_iterations=settings.iterations or 100, chunks=settings.bit_chunks,
                                      progress=current_ranks().main)
    else:
        decompositions = init_loftq(model, iterations=settings.iterations or 1, progress=current_ranks().main)
    quantized = {name: d.quantized for name, d in decompositions.items()}
    if current_ranks().main:  # every rank computed the same start; rank 0 keeps it
        save_quantized(run_dir / QUANTIZED_BASES_FILE, quantized)
    return PreparedAdapter(lora, [QuantizedAdapterExport(quantized, lora.init)], moves_base=True)


def _eva(model, tokenizer, examples, lora, config, resume: bool) -> PreparedAdapter:
    if resume:  # the run recorded the EVA config; the checkpoint holds A and B
        attach(model, _placeholder(lora))
        return PreparedAdapter(lora)
    estimate = estimate_eva(model, estimation_batches(tokenizer, examples, config), lora,
                            progress=current_ranks().main)
    shaped = eva_config(lora, estimate)
    attach(model, _placeholder(shaped))
    init_eva(model, estimate)
    return PreparedAdapter(shaped)


def _mixlora(model, lora: LoraConfig, config: TrainConfig) -> PreparedAdapter:
    """MixLoRA: the experts and routers of ``lorakit.mixtures.mixlora`` shaped by ``lora`` and the run's
    ``mixlora_*`` options; attention targets are ``lora.targets`` when they name modules."""
    option = method_options(config)
    attention = lora.targets if isinstance(lora.targets, tuple) else MixLoraConfig().attention_targets
    mix = MixLoraConfig(num_experts=int(option["mixlora_experts"]), top_k=int(option["mixlora_top_k"]),
                        rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, attention_targets=attention,
                        jitter_noise=option["mixlora_jitter"],
                        aux_loss_coefficient=option["mixlora_aux_loss_coefficient"])
    attach_mixlora(model, mix, seed=config.seed)
    return PreparedAdapter(lora)
