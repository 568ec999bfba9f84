"""Quantizing merged weights again under their bases' configurations: the last step of a quantized merge.

After :func:`~lorakit.quant.dequantize.dequantize_bases` and the core's exact merge, module ``i`` holds
``W_i = dequantize(Q_i) + s B A`` in full precision. :func:`requantize` replaces it by an ``NFLinear`` holding

    Q'_i = quantize_nf(W_i, config of Q_i)

and measures what rounding did to the merge, per layer:

    weight error  = ||dequantize(Q'_i) - W_i||_F / ||W_i||_F
    update error  = ||dequantize(Q'_i) - W_i||_F / ||s B A||_F      (>= 1: rounding erased the update)
    codes changed = the share of weights whose code in Q'_i differs from Q_i's   (near 0: rounded away)

Only lorakit's own NormalFloat bases are requantized (their configuration is known, and an ``nf-model`` directory
stores the result); bitsandbytes' layers are refused before anything changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import StateError
from lorakit.quant.code_packing import unpack_codes
from lorakit.quant.dequantize import dequantized_weight
from lorakit.quant.model_quantization import replace_module
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_tensor import NFTensor, quantize_nf


@dataclass(frozen=True)
class RequantizationError:
    """What requantizing one merged weight changed: relative to the weight and to the adapter's update, and how
    many codes moved."""

    weight: float
    update: float
    codes_changed: float


def _codes_changed(before: NFTensor, after: NFTensor) -> float:
    bits, count = before.config.bits, before.shape[0] * before.shape[1]
    padded = before.codes.numel() * 8 // bits  # every code of the padded blocks (padding codes agree)
    changed = unpack_codes(before.codes, bits, padded) != unpack_codes(after.codes, bits, padded)
    return float(changed.sum()) / count


def _relative(difference: torch.Tensor, reference: torch.Tensor) -> float:
    norm = float(torch.linalg.norm(reference))
    return float(torch.linalg.norm(difference)) / norm if norm > 0 else (0.0 if not difference.any() else math.inf)


@torch.no_grad()
def requantize(model: nn.Module, originals: Mapping[str, nn.Module]) -> dict[str, RequantizationError]:
    """Replace each merged ``nn.Linear`` named in ``originals`` (module name -> the quantized base it was merged
    from) by an ``NFLinear`` of its weight under that base's configuration; return each layer's errors."""
    others = sorted(name for name, original in originals.items() if not isinstance(original, NFLinear))
    if others:
        kind = type(originals[others[0]]).__name__
        raise StateError(f"module {others[0]!r} was a bitsandbytes {kind}: lorakit requantizes only its own "
                         "NormalFloat bases (--quantize nf4, --init lq-lora or loftq); merge into a dequantized "
                         "model instead; nothing was requantized")
    errors = {}
    for name, original in originals.items():
        merged = model.get_submodule(name)
        weight = merged.weight.float()  # (out, in): dequantize(Q) + s B A
        quantized = quantize_nf(weight, original.config)
        difference = quantized.dequantize() - weight
        errors[name] = RequantizationError(weight=_relative(difference, weight),
                                           update=_relative(difference, weight - dequantized_weight(original)),
                                           codes_changed=_codes_changed(original.quantized, quantized))
        replace_module(model, name, NFLinear(quantized, merged.bias).to(weight.device).train(merged.training))
    return errors
