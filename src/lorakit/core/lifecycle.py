"""Adding and removing adapters on a model."""

from __future__ import annotations

import re

from torch import nn

from lorakit.config import DATA_DRIVEN_INITS, LoraConfig
from lorakit.core.inject import find_targets, unwrap, wrap
from lorakit.core.layer import LoraLayer
from lorakit.core.routing import StaticRouting
from lorakit.core.state import AdapterRecord, drop_state, ensure_state, lora_layers, model_state
from lorakit.errors import AdapterError, ConfigError, StateError

_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: str) -> None:
    """Adapter names are non-empty and use letters, digits, ``_`` and ``-`` (they become module keys)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} is invalid: use letters, digits, '_' and '-'")


def attach(model: nn.Module, config: LoraConfig, name: str = "default", *, activate: bool = True,
           trainable: bool = True) -> nn.Module:
    """Add a new LoRA adapter ``name`` shaped by ``config`` to ``model`` (in place) and return ``model``.

    Base parameters are frozen; the new adapter is trainable unless ``trainable=False``. With
    ``activate`` (the default) it becomes the only active adapter. Nothing changes if the targets
    match nothing or the name is taken.
    """
    check_adapter_name(name)
    if config.init in DATA_DRIVEN_INITS:
        raise ConfigError(f"init={config.init!r} computes the adapter from training data, which attach does not "
                          "see: use lorakit.train.prepare.prepare_adapter (what lorakit train --init runs)")
    existing = getattr(model, "lorakit_state", None)
    if existing is not None and name in existing.adapters:
        raise AdapterError(f"adapter {name!r} already exists; delete it first or choose another name")
    targets = find_targets(model, config)
    state = ensure_state(model)
    _freeze_base(model, state.frozen)
    for module_name in targets:
        layer = wrap(model, module_name, state.routing)
        layer.add_adapter(name, config, module_name)
        layer.adapters[name].requires_grad_(trainable)
    state.adapters[name] = AdapterRecord(config, tuple(targets))
    if activate:
        state.routing.standing = StaticRouting.of([name], None)
    return model


def _freeze_base(model: nn.Module, frozen: list[nn.Parameter]) -> None:
    adapter_params = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in adapter_params and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(parameter)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer, the active set and the records.

    A layer left without adapters gets its base layer back; when the last adapter goes, the model
    is as it was before the first :func:`attach` (hooks removed, base parameters unfrozen).
    A merged adapter must be unmerged first.
    """
    state = model_state(model)
    record = state.require(name)
    layers = [(module_name, model.get_submodule(module_name)) for module_name in record.modules]
    if any(name in layer.merged for _, layer in layers):
        raise StateError(f"adapter {name!r} is merged into the base weights; unmerge before deleting it")
    for module_name, layer in layers:
        layer.remove_adapter(name)
        if len(layer.adapters) == 0:
            unwrap(model, module_name)
    weights = dict(state.routing.standing.weights)
    weights.pop(name, None)
    state.routing.standing = StaticRouting(weights)
    del state.adapters[name]
    if not state.adapters:
        drop_state(model)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters ``model`` holds, in the order they were added."""
    state = getattr(model, "lorakit_state", None)
    return [] if state is None else list(state.adapters)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` that requires a gradient, by name (after :func:`attach`: the adapters)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` is a layer lorakit wrapped."""
    return isinstance(module, LoraLayer)
