"""The registries of what ``TrainConfig`` names: its optimizer, its method and its regularizer, each built
as a :class:`~lorakit.methods.component.TrainingComponent`.

Each entry names its options (with defaults) in ``TrainConfig.options``; an unknown name or option is
refused with the known ones listed. Combinations that do not make sense are refused by
:mod:`lorakit.train.combinations`. A method added here needs no change to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.config import TrainConfig
from lorakit.errors import ConfigError
from lorakit.methods.codyra import CodyraSchedule
from lorakit.methods.component import TrainingComponent
from lorakit.methods.dylora import DyLoraSampler
from lorakit.mixtures.mixlora.training import MixLoraTraining
from lorakit.optim.adamw_8bit import adamw_8bit
from lorakit.optim.allora import Allora
from lorakit.optim.factor_pairs import lora_factors
from lorakit.optim.lora_pro import LoraPro
from lorakit.pruning.pat_training import PatTraining
from lorakit.quant.l4q import L4QTraining
from lorakit.regularizers.ba_lora import BaLoraWeights
from lorakit.regularizers.ba_lora_training import BaLoraRegularizer

Options = Mapping[str, Any]


@dataclass(frozen=True)
class Registered:
    """One registry entry: what builds its component from the run's config and options (None: nothing to
    add), the options it reads (with defaults), and one line about it."""

    build: Callable[[TrainConfig, Options], TrainingComponent] | None
    options: Options
    summary: str


class OptimizerChoice(TrainingComponent):
    """A component that only supplies the optimizer: ``make(model, parameters, config)``."""

    def __init__(self, make: Callable[[nn.Module, list[nn.Parameter], TrainConfig], torch.optim.Optimizer]) -> None:
        self.make = make

    def optimizer(self, model: nn.Module, parameters: list[nn.Parameter],
                  config: TrainConfig) -> torch.optim.Optimizer:
        return self.make(model, parameters, config)


def adamw(model: nn.Module, parameters: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The default optimizer: AdamW with the run's learning rate and weight decay."""
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _adamw_8bit(config: TrainConfig, options: Options) -> TrainingComponent:
    return OptimizerChoice(lambda model, parameters, cfg: adamw_8bit(parameters, lr=cfg.lr,
                                                                     weight_decay=cfg.weight_decay))


def _lora_pro(config: TrainConfig, options: Options) -> TrainingComponent:
    return OptimizerChoice(lambda model, parameters, cfg: LoraPro(
        lora_factors(model), lr=cfg.lr, weight_decay=cfg.weight_decay, delta=options["lora_pro_delta"]))


def _allora(config: TrainConfig, options: Options) -> TrainingComponent:
    return OptimizerChoice(lambda model, parameters, cfg: Allora(
        parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, eta=options["allora_eta"],
        scale=options["allora_scale"]))


def _dylora(config: TrainConfig, options: Options) -> TrainingComponent:
    return DyLoraSampler(seed=config.seed, frozen=bool(options["dylora_frozen"]))


def _codyra(config: TrainConfig, options: Options) -> TrainingComponent:
    return CodyraSchedule(max_kappa=options["codyra_max_kappa"], dense_fraction=options["codyra_dense_fraction"],
                          stages=int(options["codyra_stages"]), seed=config.seed)


def _mixlora(config: TrainConfig, options: Options) -> TrainingComponent:
    return MixLoraTraining(coefficient=options["mixlora_aux_loss_coefficient"])


def _l4q(config: TrainConfig, options: Options) -> TrainingComponent:
    return L4QTraining(bits=options["l4q_bits"], group_size=options["l4q_group_size"],
                       lsq_grad_scale=options["l4q_lsq_grad_scale"])


def _pat(config: TrainConfig, options: Options) -> TrainingComponent:
    return PatTraining(keep=options["pat_keep"], rank=options["pat_rank"], freeze=options["pat_freeze"],
                       identity_loss=options["pat_identity_loss"], mask_lr=options["pat_mask_lr"])


def _ba_lora(config: TrainConfig, options: Options) -> TrainingComponent:
    weights = BaLoraWeights(consistency=options["ba_lora_consistency"], diversity=options["ba_lora_diversity"],
                            svd=options["ba_lora_svd"], top_k=int(options["ba_lora_top_k"]))
    return BaLoraRegularizer(weights, reference=options["ba_lora_reference"], full=config.full)


OPTIMIZERS: dict[str, Registered] = {
    "adamw": Registered(None, {}, "AdamW on the trainable parameters (the trainer's default)"),
    "adamw8bit": Registered(_adamw_8bit, {}, "bitsandbytes' 8-bit AdamW: both moments in blockwise 8-bit codes"),
    "lora-pro": Registered(_lora_pro, {"lora_pro_delta": 1e-8},
                           "LoRA-Pro: Adam on the full-space equivalent gradient, mapped back to (A, B)"),
    "allora": Registered(_allora, {"allora_eta": 1.0, "allora_scale": "update"},
                         "ALLoRA: Adam with a row-wise rate 1/sqrt(|theta_i|^2 + 1/eta^2)"),
}
METHODS: dict[str, Registered] = {
    "lora": Registered(None, {}, "plain LoRA"),
    "dylora": Registered(_dylora, {"dylora_frozen": False}, "DyLoRA: a random nested rank b per step"),
    "codyra": Registered(_codyra, {"codyra_max_kappa": 5e-3, "codyra_dense_fraction": 0.5, "codyra_stages": 50},
                         "CoDyRA: gated ranks B diag(w) A, soft-thresholded, pruned at the end"),
    "mixlora": Registered(_mixlora, {"mixlora_experts": 8, "mixlora_top_k": 2, "mixlora_aux_loss_coefficient": 1e-3,
                                     "mixlora_jitter": 0.0},
                          "MixLoRA: top-k LoRA experts in every FFN (shared frozen weights), LoRA on attention"),
    "l4q": Registered(_l4q, {"l4q_bits": 4, "l4q_group_size": 128, "l4q_lsq_grad_scale": False},
                      "L4Q: LoRA trained inside the fake-quantized W0 + s B A; saves one integer-coded model"),
    "pat": Registered(_pat, {"pat_keep": 0.75, "pat_rank": 16, "pat_freeze": 0.8, "pat_identity_loss": True,
                             "pat_mask_lr": 1e-2},
                      "PAT: LoRA + hybrid sparsification modules, one shared channel mask; saves one narrower model"),
}
REGULARIZERS: dict[str, Registered] = {
    "ba-lora": Registered(_ba_lora, {"ba_lora_consistency": 1e-4, "ba_lora_diversity": 3e-4, "ba_lora_svd": 1e-4,
                                     "ba_lora_top_k": 3, "ba_lora_reference": "auto"},
                          "BA-LoRA: consistency, diversity and SVD terms against the original model"),
}


def _lookup(registry: dict[str, Registered], kind: str, name: str) -> Registered:
    if name not in registry:
        raise ConfigError(f"{kind}={name!r} is invalid: one of {', '.join(registry)}")
    return registry[name]


def _chosen(config: TrainConfig) -> list[Registered]:
    """The optimizer, method and (if any) regularizer ``config`` names, in that order."""
    chosen = [_lookup(OPTIMIZERS, "optimizer", config.optimizer), _lookup(METHODS, "method", config.method)]
    if config.regularizer is not None:
        chosen.append(_lookup(REGULARIZERS, "regularizer", config.regularizer))
    return chosen


def check_components(config: TrainConfig) -> None:
    """Refuse unknown names, and options that none of the chosen components reads."""
    known = {key for entry in _chosen(config) for key in entry.options}
    unknown = sorted(set(config.options) - known)
    if unknown:
        raise ConfigError(f"option {unknown[0]!r} is not read by optimizer={config.optimizer!r}, "
                          f"method={config.method!r}, regularizer={config.regularizer!r}; they read: "
                          f"{', '.join(sorted(known)) or 'no options'}")


def _options(entry: Registered, config: TrainConfig) -> dict[str, Any]:
    return {key: config.options.get(key, default) for key, default in entry.options.items()}


def method_options(config: TrainConfig) -> dict[str, Any]:
    """The options of ``config.method`` with its defaults filled in."""
    return _options(_lookup(METHODS, "method", config.method), config)


def components_for(config: TrainConfig) -> list[TrainingComponent]:
    """The components ``config`` names (optimizer, method, regularizer), built with their options."""
    check_components(config)
    return [entry.build(config, _options(entry, config)) for entry in _chosen(config) if entry.build is not None]
