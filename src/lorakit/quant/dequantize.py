"""Full-precision copies of quantized linears (lorakit's ``NFLinear``, bitsandbytes' ``Linear4bit`` and
``Linear8bitLt``): the first step of merging an adapter into a quantized base.

    NFLinear       W = dequantize_nf(codes, scales)                  (exact: what its forward multiplies by)
    Linear4bit     W = bitsandbytes.functional.dequantize_4bit(...)  (NF4 / FP4, nested statistics or not)
    Linear8bitLt   W = CB * SCB / 127                                (LLM.int8()'s per-row absmax int8)

Each becomes an ``nn.Linear`` (float32, frozen, on the layer's device, in its train/eval mode) with the bias
kept. An adapter's wrapper gets the linear kind of its new base, so the core's exact merge applies to it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit.core.kinds import is_quantized_linear, kind_of
from lorakit.core.layer import LoraLayer
from lorakit.core.state import lora_layers
from lorakit.errors import TargetError
from lorakit.quant.model_quantization import replace_module
from lorakit.quant.nf_linear import NFLinear


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight (out, in) in float32 that the quantized linear ``module`` multiplies by."""
    if isinstance(module, NFLinear):
        return module.weight
    name = type(module).__name__
    if name == "Linear8bitLt":  # the int8 codes are the weight's data; its first forward moves SCB to the state
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB  # (out,)
        return module.weight.data.float() * scales.float()[:, None] / 127
    if name == "Linear4bit":
        import bitsandbytes.functional as bnb_functional
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise TargetError(f"this {name} holds its codes in bitsandbytes' AVX-512 CPU layout, which has no public "
                              "dequantization; load the model again and merge before running it in eval mode")
        return bnb_functional.dequantize_4bit(module.weight.data, state).float()
    raise TargetError(f"a {name} is not a quantized linear lorakit can dequantize (NFLinear, Linear4bit, "
                      "Linear8bitLt)")


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` holding :func:`dequantized_weight` and its bias (float32, frozen)."""
    weight = dequantized_weight(module)  # (out, in)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear.requires_grad_(False).train(module.training)


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear of ``model`` by the name of the module that holds its place: the LoRA layer wrapping
    it, or its own."""
    found = {name: layer.base_layer for name, layer in lora_layers(model) if is_quantized_linear(layer.base_layer)}
    found.update({name: module for name, module in model.named_modules()
                  if is_quantized_linear(module) and not name.endswith(".base_layer")})
    return found


def dequantized_copies(model: nn.Module) -> dict[str, nn.Linear]:
    """The :func:`dequantized_linear` of every quantized linear of ``model``, by the name of its place, leaving the
    model as it is. Take them before the model runs in eval mode on a CPU with AVX-512 BF16, where bitsandbytes
    repacks its 4-bit codes into a layout it offers no dequantization for."""
    return {name: dequantized_linear(module) for name, module in _quantized_linears(model).items()}


def dequantize_bases(model: nn.Module, copies: Mapping[str, nn.Linear] | None = None) -> dict[str, nn.Module]:
    """Replace each quantized base that a LoRA layer wraps by its :func:`dequantized_linear` (or its entry in
    ``copies``, from :func:`dequantized_copies`); return the quantized originals by module name."""
    originals = {}
    for module_name, layer in lora_layers(model):
        if is_quantized_linear(layer.base_layer):
            originals[module_name] = layer.base_layer
            linear = copies[module_name] if copies is not None else dequantized_linear(layer.base_layer)
            layer.base_layer = linear
            layer.kind = kind_of(linear, module_name)
    return originals


def dequantize_linears(model: nn.Module, copies: Mapping[str, nn.Linear] | None = None) -> list[str]:
    """Replace every quantized linear of ``model`` that no LoRA layer wraps by its :func:`dequantized_linear` (or its
    entry in ``copies``); return their names."""
    names = [name for name in _quantized_linears(model) if not isinstance(model.get_submodule(name), LoraLayer)]
    for name in names:
        linear = copies[name] if copies is not None else dequantized_linear(model.get_submodule(name))
        replace_module(model, name, linear)
    return names
