"""Which modules an adapter wraps: target matching, the dry run, and wrapping itself.

Targets come in three forms (PEFT's rules): ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the
output head), a regular expression matched against the whole module name, or a list of names each
matching a module whose name equals it or ends with ``"." + name``. When nothing matches, the error
lists the names that could have been meant; a matched module of an unsupported type is named.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.core.kinds import is_linear, is_supported, kind_of
from lorakit.core.layer import LoraLayer
from lorakit.core.routing import RoutingState
from lorakit.errors import TargetError


@dataclass(frozen=True)
class TargetPlan:
    """One module an adapter would wrap, as the dry run reports it."""

    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float


def _matches(spec: str | Sequence[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that a target may name: not the model itself and nothing inside a LoraLayer."""
    inside = {name + "." for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    return [(name, module) for name, module in model.named_modules()
            if name and not any(name.startswith(prefix) for prefix in inside)]


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names of the modules ``config`` targets, in model order; loud when there are none."""
    candidates = candidate_modules(model)
    if config.targets == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n, m in candidates if (is_linear(m) or _is_wrapped_linear(m)) and n not in heads]
    else:
        chosen = [n for n, _ in candidates if _matches(config.targets, n)]
    if config.exclude is not None:
        chosen = [n for n in chosen if not _matches(config.exclude, n)]
    if not chosen:
        supported = sorted({n.rsplit(".", 1)[-1] for n, m in candidates
                            if is_supported(m) or isinstance(m, LoraLayer)})
        excluded = f" once exclude {config.exclude!r} is applied" if config.exclude is not None else ""
        raise TargetError(f"targets {config.targets!r} matched no module of {type(model).__name__}{excluded}; "
                          f"adaptable module names: {', '.join(supported) or '(none)'}")
    modules = dict(candidates)
    for name in chosen:
        module = modules[name]
        if not isinstance(module, LoraLayer):
            kind_of(module, name)  # raises a TargetError naming an unsupported type
    return chosen


def _is_wrapped_linear(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) and is_linear(module.base_layer)


def plan(model: nn.Module, config: LoraConfig) -> list[TargetPlan]:
    """The dry run: what ``attach(model, config)`` would wrap, with each module's rank, alpha and scale."""
    modules = dict(model.named_modules())
    plans = []
    for name in find_targets(model, config):
        module = modules[name]
        base = module.base_layer if isinstance(module, LoraLayer) else module
        plans.append(TargetPlan(name, type(base).__name__, tuple(base.weight.shape), config.rank_for(name),
                                config.alpha_for(name), config.scale_for(name)))
    return plans


def wrap(model: nn.Module, name: str, routing: RoutingState) -> LoraLayer:
    """Replace module ``name`` by a :class:`LoraLayer` around it (or return the one already there)."""
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module, kind_of(module, name), routing)
    _set_submodule(model, name, layer)
    return layer


def unwrap(model: nn.Module, name: str) -> None:
    """Put the base layer of the :class:`LoraLayer` at ``name`` back in its place."""
    layer = model.get_submodule(name)
    _set_submodule(model, name, layer.base_layer)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
