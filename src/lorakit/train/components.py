"""The registries of what a training run can swap: its optimizer, its method and its regularizer.

Each entry names its options (with defaults) in ``TrainConfig.options``; an unknown name or option is
refused with the known ones listed. Combinations that do not make sense are refused by
:mod:`lorakit.train.combinations`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.config import TrainConfig
    from lorakit.methods.component import TrainingExtension


@dataclass(frozen=True)
class Component:
    """One registry entry: what builds it, the options it reads (with defaults), and one line about it."""

    build: Callable[..., Any] | None
    options: Mapping[str, Any]
    summary: str


def _adamw(model, parameters, config, options):
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _lora_pro(model, parameters, config, options):
    from lorakit.optim.factors import lora_factors
    from lorakit.optim.lora_pro import LoraPro
    return LoraPro(lora_factors(model), lr=config.lr, weight_decay=config.weight_decay,
                   delta=options["lora_pro_delta"])


def _allora(model, parameters, config, options):
    from lorakit.optim.allora import Allora
    return Allora(parameters, lr=config.lr, weight_decay=config.weight_decay, eta=options["allora_eta"],
                  scale=options["allora_scale"])


def _dylora(model, config, options, reference):
    from lorakit.methods.dylora import DyLoraSampler
    return DyLoraSampler(model, seed=config.seed, frozen=bool(options["dylora_frozen"]))


def _codyra(model, config, options, reference):
    from lorakit.methods.codyra import CodyraSchedule
    return CodyraSchedule(model, max_kappa=options["codyra_max_kappa"], dense_fraction=options["codyra_dense_fraction"],
                          stages=int(options["codyra_stages"]), seed=config.seed)


def _mixlora(model, config, options, reference):
    from lorakit.mixtures.mixlora import MixLoraAuxLoss
    return MixLoraAuxLoss(model, coefficient=options["mixlora_aux_loss_coefficient"])


def _ba_lora(model, config, options, reference):
    from lorakit.regularizers.ba_lora import BaLoraWeights
    from lorakit.regularizers.ba_lora_training import BaLoraRegularizer
    weights = BaLoraWeights(consistency=options["ba_lora_consistency"], diversity=options["ba_lora_diversity"],
                            svd=options["ba_lora_svd"], top_k=int(options["ba_lora_top_k"]))
    return BaLoraRegularizer(model, weights, reference=reference)


OPTIMIZERS: dict[str, Component] = {
    "adamw": Component(_adamw, {}, "AdamW on the trainable parameters"),
    "lora-pro": Component(_lora_pro, {"lora_pro_delta": 1e-8},
                          "LoRA-Pro: Adam on the full-space equivalent gradient, mapped back to (A, B)"),
    "allora": Component(_allora, {"allora_eta": 1.0, "allora_scale": "update"},
                        "ALLoRA: Adam with a row-wise rate 1/sqrt(|theta_i|^2 + 1/eta^2)"),
}
METHODS: dict[str, Component] = {
    "lora": Component(None, {}, "plain LoRA"),
    "dylora": Component(_dylora, {"dylora_frozen": False}, "DyLoRA: a random nested rank b per step"),
    "codyra": Component(_codyra, {"codyra_max_kappa": 5e-3, "codyra_dense_fraction": 0.5, "codyra_stages": 50},
                        "CoDyRA: gated ranks B diag(w) A, soft-thresholded, pruned at the end"),
    "mixlora": Component(_mixlora, {"mixlora_experts": 8, "mixlora_top_k": 2, "mixlora_aux_loss_coefficient": 1e-3,
                                    "mixlora_jitter": 0.0},
                         "MixLoRA: top-k LoRA experts in every FFN (shared frozen weights), LoRA on attention"),
}
REGULARIZERS: dict[str, Component] = {
    "ba-lora": Component(_ba_lora, {"ba_lora_consistency": 1e-4, "ba_lora_diversity": 3e-4, "ba_lora_svd": 1e-4,
                                    "ba_lora_top_k": 3},
                         "BA-LoRA: consistency, diversity and SVD terms against the original model"),
}


def _lookup(registry: dict[str, Component], kind: str, name: str) -> Component:
    if name not in registry:
        raise ConfigError(f"{kind}={name!r} is invalid: one of {', '.join(registry)}")
    return registry[name]


def chosen_components(config: TrainConfig) -> list[Component]:
    """The optimizer, method and (if any) regularizer ``config`` names."""
    chosen = [_lookup(OPTIMIZERS, "optimizer", config.optimizer), _lookup(METHODS, "method", config.method)]
    if config.regularizer is not None:
        chosen.append(_lookup(REGULARIZERS, "regularizer", config.regularizer))
    return chosen


def check_components(config: TrainConfig) -> None:
    """Refuse unknown names, and options that none of the chosen components reads."""
    known = {key for component in chosen_components(config) for key in component.options}
    unknown = sorted(set(config.options) - known)
    if unknown:
        raise ConfigError(f"option {unknown[0]!r} is not read by optimizer={config.optimizer!r}, "
                          f"method={config.method!r}, regularizer={config.regularizer!r}; they read: "
                          f"{', '.join(sorted(known)) or 'no options'}")


def _options(component: Component, config: TrainConfig) -> dict[str, Any]:
    return {key: config.options.get(key, default) for key, default in component.options.items()}


def method_options(config: TrainConfig) -> dict[str, Any]:
    """The options of ``config.method`` with its defaults filled in."""
    return _options(_lookup(METHODS, "method", config.method), config)


def build_optimizer(model: nn.Module, parameters: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``parameters`` (the pair-wise ones read ``model``)."""
    component = _lookup(OPTIMIZERS, "optimizer", config.optimizer)
    return component.build(model, parameters, config, _options(component, config))


def build_extensions(model: nn.Module, config: TrainConfig,
                     reference: nn.Module | None = None) -> list[TrainingExtension]:
    """The loop hooks of ``config.method`` and ``config.regularizer`` (``reference``: BA-LoRA's frozen
    original model; None means the model itself with its adapters disabled)."""
    components = [_lookup(METHODS, "method", config.method)]
    if config.regularizer is not None:
        components.append(_lookup(REGULARIZERS, "regularizer", config.regularizer))
    return [c.build(model, config, _options(c, config), reference) for c in components if c.build is not None]
