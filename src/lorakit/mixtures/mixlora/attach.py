"""Turning a causal LM into a MixLoRA model: the attention adapter, the experts, one router per block.

``attach_mixlora`` finds every gated FFN by structure (:mod:`.structure`), attaches one always-on
LoRA adapter ``attention`` to the attention projections, E LoRA adapters ``expert0``..``expert{E-1}``
to each FFN's gate, up and down projections (not active: only :class:`MixLoraFFN` applies them), and
puts a :class:`MixLoraFFN` with its own router in place of each FFN. The base stays frozen; the
attention adapter, the experts and the routers train (Li et al. 2024, arXiv 2404.15159).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.lifecycle import attach
from lorakit.errors import StateError
from lorakit.mixtures.mixlora.config import MixLoraConfig
from lorakit.mixtures.mixlora.ffn import MixLoraFFN
from lorakit.mixtures.mixlora.router import Router
from lorakit.mixtures.mixlora.structure import PROJECTIONS, base_linear, find_ffns

ATTENTION = "attention"
"""The name of the always-on attention adapter."""


def expert_names(config: MixLoraConfig) -> list[str]:
    """The experts' adapter names; position i is the routers' output i."""
    return [f"expert{i}" for i in range(config.num_experts)]


def lora_config(config: MixLoraConfig, targets: tuple[str, ...]) -> LoraConfig:
    """The plain LoRA shape shared by the attention adapter and the experts."""
    return LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=targets)


def expert_targets(ffns: list[str]) -> tuple[str, ...]:
    """The full paths of the FFNs' projections (exact names: nothing else can match)."""
    return tuple(f"{ffn}.{projection}" for ffn in ffns for projection in PROJECTIONS)


def mixlora_layers(model: nn.Module) -> list[tuple[str, MixLoraFFN]]:
    """The MixLoRA FFNs of ``model`` with their paths, in model order; a :class:`StateError` if none."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MixLoraFFN)]
    if not layers:
        raise StateError(f"{type(model).__name__} has no MixLoRA layers; call attach_mixlora or load_mixlora first")
    return layers


def attach_mixlora(model: nn.Module, config: MixLoraConfig = MixLoraConfig(), *, seed: int = 0) -> list[MixLoraFFN]:
    """Make ``model`` a MixLoRA model in place (see the module docstring) and return its MixLoRA FFNs.

    ``seed`` fixes the LoRA and router initialisation (torch's global RNG is left as it was). The
    attention adapter becomes the only active adapter.
    """
    if any(isinstance(m, MixLoraFFN) for m in model.modules()):
        raise StateError("the model already has MixLoRA layers")
    ffns = find_ffns(model)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if config.attention_targets:
            attach(model, lora_config(config, config.attention_targets), ATTENTION)
        for name in expert_names(config):
            attach(model, lora_config(config, expert_targets(ffns)), name, activate=False)
        routers = {}
        for ffn in ffns:
            routers[ffn] = new_router(model.get_submodule(ffn), config)
            nn.init.normal_(routers[ffn].weight, std=config.router_init_range)
    return wrap_ffns(model, ffns, config, routers)


def new_router(ffn: nn.Module, config: MixLoraConfig) -> Router:
    """``W_g`` for ``ffn``, on its device (its weights to be set by the caller)."""
    weight = base_linear(ffn.gate_proj).weight
    return Router(weight.shape[1], config.num_experts, device=weight.device)


def wrap_ffns(model: nn.Module, ffns: list[str], config: MixLoraConfig,
              routers: Mapping[str, Router]) -> list[MixLoraFFN]:
    """Put a :class:`MixLoraFFN` with ``routers[path]`` in place of each FFN (its adapters already attached)."""
    wrapped = []
    for path in ffns:
        ffn = model.get_submodule(path)
        layer = MixLoraFFN(ffn, config, expert_names(config), routers[path]).train(ffn.training)  # keep eval/train
        model.set_submodule(path, layer)
        wrapped.append(layer)
    return wrapped
