"""Folding adapters into the base weights, explicitly: ``W0 <- W0 + w s B A``.

Merging moves computation, never meaning: a layer subtracts in its forward whatever is merged but not
asked for by the routing, so outputs are the same before and after :func:`merge` and :func:`unmerge`.
Every merge checks finiteness first and changes nothing if any factor or result is not finite, nor if a
layer's kind refuses merging (a quantized base). A base weight that another module shares (tied input and output
embeddings) is untied before an adapter merges into it: the layer gets its own copy and ``config.tie_word_embeddings``
becomes False, so the merge changes that layer alone and a saved merged model keeps both matrices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.core.inject import unwrap
from lorakit.core.layer import LoraLayer
from lorakit.core.state import drop_state, lora_layers, model_state
from lorakit.errors import StateError


def merge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters into the base weights: by default the active ones at their active weights;
    named adapters that are not active are folded at weight 1. Merging twice changes nothing."""
    state = model_state(model)
    if state.routing.call is not None:
        raise StateError("cannot merge while a mixed batch (adapter_per_row) or a mixture's routing is in force")
    standing = state.routing.standing.weights
    if names is None:
        weights = dict(standing)
        if not weights:
            raise StateError("no adapter is active, so there is nothing to merge; pass names or call set_active")
    else:
        weights = {name: standing.get(name, 1.0) for name in names}
    for name in weights:
        state.require(name)
    for module_name, layer in lora_layers(model):
        if any(name in layer.adapters for name in weights):
            layer.kind.check_merge(layer.base_layer, module_name)
    layers = [layer for _, layer in lora_layers(model)]
    _check_finite(layers, weights)
    _untie(model, [layer for layer in layers if any(name in layer.adapters for name in weights)])
    done: list[tuple[LoraLayer, str, float]] = []
    try:
        for layer in layers:
            for name, weight in weights.items():
                if name in layer.adapters:
                    previous = layer.merged.get(name, 0.0)
                    layer.merge(name, weight)
                    done.append((layer, name, previous))
    except StateError:
        for layer, name, previous in reversed(done):
            layer.merge(name, previous)
        raise


def _untie(model: nn.Module, layers: list[LoraLayer]) -> None:
    """Give each of ``layers`` whose base weight another module shares a copy of its own (module docstring)."""
    owners = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    for layer in layers:
        weight = layer.base_layer.weight
        if owners[id(weight)] > 1:
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            owners[id(weight)] -= 1
            if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
                model.config.tie_word_embeddings = False


def _check_finite(layers: list[LoraLayer], weights: dict[str, float]) -> None:
    for layer in layers:
        for name in weights:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is not None and not (torch.isfinite(adapter.A).all() and torch.isfinite(adapter.B).all()):
                raise StateError(f"adapter {name!r} holds non-finite values (NaN or inf) in its "
                                 f"{layer.kind.name} layer; refusing to merge it, nothing was merged")


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merged_adapters(model: nn.Module) -> dict[str, float]:
    """The adapters merged anywhere in ``model``, with their merge weights."""
    merged: dict[str, float] = {}
    for _, layer in lora_layers(model):
        merged.update(layer.merged)
    return merged


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge (as :func:`merge`), then remove every adapter and wrapper: a plain model with the merged weights."""
    merge(model, names)
    for module_name, _ in list(lora_layers(model)):
        unwrap(model, module_name)
    drop_state(model)
    return model
