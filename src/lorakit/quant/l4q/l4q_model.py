"""Turning a LoRA-adapted model into an L4Q model and back out as a fully quantized one.

    lorakit.attach(model, LoraConfig(rank=16, alpha=32, targets="all-linear"))
    attach_l4q(model, bits=4, group_size=128)   # every adapted nn.Linear -> L4QLinear (QAT with LoRA inside)
    ...                                          # train: A, B, step and offset require gradients
    finalize_l4q(model)                          # every L4QLinear -> UniformQuantizedLinear, adapter gone

Jeon, Kim, Kim, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models"
(ACL'25, arXiv 2402.04902).
"""

from __future__ import annotations

from torch import nn

from lorakit.core.layer import LoraLayer
from lorakit.core.state import drop_state, model_state
from lorakit.errors import AdapterError, StateError
from lorakit.quant.l4q.config import L4QConfig
from lorakit.quant.l4q.l4q_linear import L4QLinear
from lorakit.quant.l4q.uniform_linear import UniformQuantizedLinear
from lorakit.quant.model_quantization import replace_module


def attach_l4q(model: nn.Module, name: str = "default", bits: int = 4, group_size: int = 128, *,
               lsq_grad_scale: bool = False) -> list[str]:
    """Replace every layer adapted by ``name`` (a :class:`LoraLayer` on an ``nn.Linear``) by an :class:`L4QLinear`
    reusing its ``A``, ``B`` and scale, with step and offset from each group's min and max of ``W0``.

    Idempotent: layers converted already are kept as they are (a resumed run attaches again before its
    checkpoint restores step and offset). Checks every layer before changing any; a :class:`TargetError` names
    an adapted layer that is not an ``nn.Linear``. Returns the names of the layers converted now."""
    config = L4QConfig(bits=bits, group_size=group_size, lsq_grad_scale=lsq_grad_scale)
    record = model_state(model).require(name)
    layers = {module_name: model.get_submodule(module_name) for module_name in record.modules}
    pending = {module_name: layer for module_name, layer in layers.items() if isinstance(layer, LoraLayer)}
    odd = [module_name for module_name, layer in layers.items()
           if not isinstance(layer, (LoraLayer, L4QLinear, UniformQuantizedLinear))]
    if odd:
        raise StateError(f"adapter {name!r}'s module {odd[0]!r} is a {type(layers[odd[0]]).__name__}, neither a LoRA "
                         "layer nor an L4Q one; was the model changed since the adapter was attached?")
    if any(isinstance(layer, UniformQuantizedLinear) for layer in layers.values()):
        raise StateError(f"adapter {name!r} was finalized already (its layers are quantized); nothing to attach")
    converted = {module_name: L4QLinear(layer, name, config, module_name) for module_name, layer in pending.items()}
    for module_name, module in converted.items():
        replace_module(model, module_name, module)
    return list(converted)


def l4q_layers(model: nn.Module) -> dict[str, L4QLinear]:
    """Every :class:`L4QLinear` of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, L4QLinear)}


def finalize_l4q(model: nn.Module) -> list[str]:
    """Replace every :class:`L4QLinear` by the :class:`UniformQuantizedLinear` it finalizes to (the same outputs),
    and forget the adapters folded into them; when no adapter is left, lorakit's state goes too (its hooks
    removed, the base parameters it froze trainable again). Returns the names of the layers finalized."""
    layers = l4q_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} holds no L4Q layers; call attach_l4q first")
    finalized = {module_name: layer.finalize() for module_name, layer in layers.items()}  # all checked first
    for module_name, module in finalized.items():
        replace_module(model, module_name, module)
    state = getattr(model, "lorakit_state", None)
    if state is not None:
        for adapter in {layer.name for layer in layers.values()}:
            state.adapters.pop(adapter, None)
        if not state.adapters:
            drop_state(model)
    return list(finalized)
