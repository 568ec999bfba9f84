"""CoDyRA (Lu et al., "Continual Dynamic Rank-Selective LoRA", arXiv 2412.01004): importance-gated
ranks that sparsify during training, pruned and merged at the end of each task.

The update is ``delta = s B diag(w) A x`` with learnable gates ``w`` (one per rank component, drawn
``N(0, 1)`` as in the released code); lorakit sets ``s = 1`` (the paper has no ``alpha / r``). The
first ``dense_fraction`` of the steps train densely; after every later optimizer step the gates take
a proximal (soft-threshold) step ``w <- sign(w) max(|w| - lambda, 0)``, the proximal operator of an
L1 penalty, with ``lambda`` rising stepwise from 0 to ``max_kappa`` over ``stages`` stages of the
sparse phase. At the end the zero-gated components are dropped and ``w`` is folded into ``A``
(:func:`prune_gates`): a plain LoRA adapter with rank ``|w|_0`` per module, saved in PEFT format with
exact rank and alpha patterns. :mod:`lorakit.jobs.continual` merges it and starts the next task.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import torch
from torch import nn

from lorakit.core.state import lora_layers, model_state
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.component import TrainingComponent


def _gated(model: nn.Module, name: str):
    found = [(module, layer.adapters[name]) for module, layer in lora_layers(model) if name in layer.adapters]
    if not found:
        raise AdapterError(f"the model holds no adapter {name!r}")
    return found


def add_gates(model: nn.Module, name: str = "default", *, seed: int = 0) -> None:
    """Give every module of adapter ``name`` trainable gates ``w ~ N(0, 1)`` (kept if it already has them)."""
    generator = torch.Generator().manual_seed(seed)
    for _, adapter in _gated(model, name):
        if adapter.gate is None:
            values = torch.randn(adapter.rank, generator=generator).to(adapter.A.device)
            adapter.gate = nn.Parameter(values, requires_grad=adapter.A.requires_grad)


def threshold_at(step: int, total: int, *, max_kappa: float, dense_fraction: float = 0.5, stages: int = 50) -> float:
    """The soft threshold after step ``step`` of ``total``: 0 in the dense phase, then
    ``max_kappa * stage / (stages - 1)`` where the stage rises by one every ``(sparse steps) / stages``
    steps, from 1 at the first sparse step up to ``stages - 1``."""
    dense = int(dense_fraction * total)
    if step < dense:
        return 0.0
    per_stage = max(1, (total - dense) // stages)
    stage = min(stages - 1, 1 + (step - dense) // per_stage)
    return max_kappa * stage / max(1, stages - 1)


@torch.no_grad()
def soft_threshold_(model: nn.Module, threshold: float, name: str = "default") -> None:
    """``w <- sign(w) max(|w| - threshold, 0)`` for every gate of adapter ``name``."""
    for _, adapter in _gated(model, name):
        if adapter.gate is not None:
            gate = adapter.gate
            gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0.0))


def active_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Each module's active rank ``|w|_0`` (its full rank where it has no gates)."""
    return {module: int((adapter.gate != 0).sum()) if adapter.gate is not None else adapter.rank
            for module, adapter in _gated(model, name)}


@torch.no_grad()
def prune_gates(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Drop adapter ``name``'s zero-gated components and fold ``w`` into ``A``: ``A' = (diag(w) A)[kept]``,
    ``B' = B[:, kept]``; the model's output is unchanged. Alpha is adjusted so every scale stays; the
    adapter's config gets exact per-module rank and alpha patterns. A module whose gates are all zero
    keeps one zero component (PEFT has no rank 0). Returns each module's new rank."""
    record = model_state(model).require(name)
    ranks, alphas = {}, {}
    for module, adapter in _gated(model, name):
        if adapter.gate is None:
            ranks[module], alphas[module] = adapter.rank, adapter.alpha
            continue
        kept = adapter.gate.nonzero().squeeze(-1)
        A, B = adapter.gated_A().index_select(0, kept), adapter.B.index_select(1, kept)
        if kept.numel() == 0:
            A, B = adapter.A[:1] * 0, adapter.B[:, :1] * 0
        trainable = adapter.A.requires_grad
        adapter.A = nn.Parameter(A.contiguous(), requires_grad=trainable)
        adapter.B = nn.Parameter(B.contiguous(), requires_grad=trainable)
        adapter.gate = None
        adapter.rank = A.shape[0]
        adapter.alpha = adapter.scale * (math.sqrt(adapter.rank) if adapter.rslora else adapter.rank)
        ranks[module], alphas[module] = adapter.rank, adapter.alpha
    config = record.config
    record.config = replace(config, rank_pattern={"^" + re.escape(m): r for m, r in ranks.items() if r != config.rank},
                            alpha_pattern={"^" + re.escape(m): a for m, a in alphas.items() if a != config.alpha})
    return ranks


class CodyraSchedule(TrainingComponent):
    """Adds the gates when the run starts, soft-thresholds them after each sparse-phase step and prunes
    them when the run finishes."""

    def __init__(self, *, max_kappa: float = 5e-3, dense_fraction: float = 0.5, stages: int = 50,
                 name: str = "default", seed: int = 0) -> None:
        if not (max_kappa >= 0 and 0 <= dense_fraction <= 1 and isinstance(stages, int) and stages >= 1):
            raise ConfigError(f"CoDyRA needs codyra_max_kappa >= 0 (got {max_kappa}), codyra_dense_fraction in "
                              f"[0, 1] (got {dense_fraction}) and integer codyra_stages >= 1 (got {stages})")
        self.name, self.seed = name, seed
        self.max_kappa, self.dense_fraction, self.stages = max_kappa, dense_fraction, stages
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        self.model = model
        add_gates(model, self.name, seed=self.seed)

    def after_step(self, step: int, total: int) -> None:
        threshold = threshold_at(step, total, max_kappa=self.max_kappa, dense_fraction=self.dense_fraction,
                                 stages=self.stages)
        if threshold > 0:
            soft_threshold_(self.model, threshold, self.name)

    def finish(self) -> None:
        prune_gates(self.model, self.name)
