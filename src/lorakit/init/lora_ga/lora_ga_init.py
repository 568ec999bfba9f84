"""LoRA-GA: initialise an adapter from the SVD of the full-weight gradient (Wang, Yu, Li 2024,
"LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000).

Two explicit steps, values passed in between::

    grads = estimate_gradients(model, batches, targets=config)   # plain model; saveable
    lorakit.attach(model, config)
    init = init_lora_ga(model, grads)          # A0, B0 from the SVD; W0 -> W0 - s B0 A0
    ...                                        # train as plain LoRA
    save_lora_ga_adapter(model, "out/", "default", init)   # rank-2r adapter for the *original* base

After one step from ``(A0, B0)`` the adapter's update approximates the full fine-tuning step
(:mod:`lorakit.init.lora_ga.svd_factors`); the base offset keeps the initial model unchanged
(:mod:`lorakit.init.lora_ga.offset`); the export folds the offset back into the saved adapter
(:mod:`lorakit.init.lora_ga.export`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit.core.kinds import LinearKind
from lorakit.core.state import model_state
from lorakit.errors import AdapterError, StateError, TargetError
from lorakit.init.lora_ga.offset import LoraGaInit, offset_base
from lorakit.init.lora_ga.svd_factors import check_options, lora_ga_factors


def init_lora_ga(model: nn.Module, grads: Mapping[str, torch.Tensor], name: str = "default", *,
                 direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16,
                 convention: str = "official", seed: int = 0) -> LoraGaInit:
    """Set adapter ``name`` to LoRA-GA's ``(A0, B0)`` and offset each base weight by ``-s B0 A0``.

    ``grads`` maps every module of the adapter to its gradient (d_out, d_in), as
    :func:`estimate_gradients` returns it; ``direction``, ``scale``, ``stable_gamma`` and ``convention`` are
    described in :mod:`lorakit.init.lora_ga.svd_factors` (defaults: the official ``ArB2r``, ``stable``,
    ``gamma = 16``); ``seed`` fixes the randomized SVD and the ``"random"`` split. Everything is checked
    before the model changes. The model's outputs are unchanged (up to fp32 rounding of the offset).
    Returns the :class:`LoraGaInit` that :func:`save_lora_ga_adapter` needs to save the adapter correctly.
    """
    check_options(direction, scale, convention, stable_gamma)
    record = model_state(model).require(name)
    layers = {module_name: model.get_submodule(module_name) for module_name in record.modules}
    _check(layers, grads, name)
    generator = torch.Generator().manual_seed(seed)
    A0, B0, scales = {}, {}, {}
    for module_name, layer in layers.items():
        adapter = layer.adapters[name]
        weight = layer.base_layer.weight
        grad = grads[module_name].to(weight.device, torch.float32)
        A, B = lora_ga_factors(grad, weight, adapter.rank, adapter.scale, direction=direction, scale=scale,
                               stable_gamma=stable_gamma, convention=convention, seed=seed, generator=generator)
        A0[module_name], B0[module_name], scales[module_name] = A.cpu(), B.cpu(), adapter.scale
    init = LoraGaInit(A0, B0, scales)
    start_from(model, init, name)
    return init


def start_from(model: nn.Module, init: LoraGaInit, name: str = "default") -> None:
    """Set adapter ``name`` to ``init``'s ``(A0, B0)`` and offset the base by ``-s B0 A0``: the state
    :func:`init_lora_ga` leaves, rebuilt from a saved :class:`LoraGaInit` (e.g. to resume a run)."""
    with torch.no_grad():
        for module_name in init.modules:
            adapter = model.get_submodule(module_name).adapters[name]
            adapter.A.copy_(init.A[module_name])
            adapter.B.copy_(init.B[module_name])
    offset_base(model, init)


def _check(layers: dict[str, nn.Module], grads: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse non-linear layers, merged adapters and missing or misshapen gradients, naming the module."""
    for module_name, layer in layers.items():
        if not isinstance(layer.kind, LinearKind):
            raise TargetError(f"LoRA-GA initialises Linear and Conv1D layers only; adapter {name!r} wraps "
                              f"{module_name!r}, an {type(layer.base_layer).__name__}: leave it out of the targets")
        if layer.merged:
            raise StateError(f"adapters {sorted(layer.merged)} are merged into {module_name!r}; unmerge them "
                             "before a LoRA-GA init, which moves the base weight")
        if module_name not in grads:
            raise AdapterError(f"no gradient for module {module_name!r} of adapter {name!r} (the estimate covers "
                               f"{len(grads)} modules); estimate gradients with the adapter's LoraConfig as targets")
        adapter = layer.adapters[name]
        shape = (adapter.B.shape[0], adapter.A.shape[1])
        if tuple(grads[module_name].shape) != shape:
            raise AdapterError(f"the gradient for module {module_name!r} has shape {tuple(grads[module_name].shape)}"
                               f", but its weight is {shape} (d_out, d_in); was it estimated on another model?")

