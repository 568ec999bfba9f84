"""The quantizations ``lorakit train --quantize`` applies to a base as it loads: ``nf4`` and ``int8``.

- ``nf4``: lorakit's :class:`NFLinear` under :data:`QLORA_NF4` (QLoRA, Dettmers et al. 2023: NormalFloat-4 codes in
  blocks of 64, the absmax scales double-quantized to 8 bits), 4.127 bits per weight; pure PyTorch, CPU and CUDA.
- ``int8``: bitsandbytes' ``Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022: a per-row absmax int8 weight, input
  columns with an outlier above ``threshold`` = 6 computed in full precision), 8 bits per weight plus one scale per
  row; needs the optional ``bitsandbytes`` package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.quant.nf_config import QLORA_NF4
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_tensor import quantize_nf

INT8_THRESHOLD = 6.0
"""LLM.int8()'s outlier threshold: input columns with a magnitude above it stay in full precision."""


@dataclass(frozen=True)
class BaseScheme:
    """One ``--quantize`` choice: how it turns a linear layer's weight and bias into a frozen quantized layer."""

    name: str
    quantize: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
    """``(weight (out, in), bias (out,) or None) -> layer``."""
    summary: str
    cached: bool
    """Whether the quantized base is cached on disk (lorakit's own format reloads bit for bit)."""


def _nf4(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return NFLinear(quantize_nf(weight, QLORA_NF4), bias)


def _int8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("--quantize int8 uses bitsandbytes' LLM.int8(), and bitsandbytes is not installed: "
                          "pip install 'bitsandbytes>=0.50' (or use --quantize nf4, which needs nothing)") from None
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
    layer.weight = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantizes the weight as it moves it


SCHEMES: dict[str, BaseScheme] = {
    "nf4": BaseScheme("nf4", _nf4, "lorakit's NF4, blocks of 64, double-quantized scales (QLoRA)", cached=True),
    "int8": BaseScheme("int8", _int8, "bitsandbytes' LLM.int8() (Linear8bitLt, outlier threshold 6)", cached=False),
}


def base_scheme(name: str) -> BaseScheme:
    """The scheme called ``name``; a :class:`ConfigError` lists the known ones."""
    if name not in SCHEMES:
        raise ConfigError(f"--quantize {name!r} is invalid: one of {', '.join(SCHEMES)}")
    return SCHEMES[name]
