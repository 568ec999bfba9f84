"""The quantizations ``lorakit train --quantize`` applies to a base as it loads: ``nf4``, ``int8``, ``bnb-nf4``
and ``bnb-fp4``.

- ``nf4``: lorakit's :class:`NFLinear` under :data:`QLORA_NF4` (QLoRA, Dettmers et al. 2023: NormalFloat-4 codes in
  blocks of 64, the absmax scales double-quantized to 8 bits), 4.127 bits per weight; pure PyTorch, CPU and CUDA.
- ``int8``: bitsandbytes' ``Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022: a per-row absmax int8 weight, input
  columns with an outlier above ``threshold`` = 6 computed in full precision), 8 bits per weight plus one scale per
  row; needs the optional ``bitsandbytes`` package.
- ``bnb-nf4`` / ``bnb-fp4``: the model as transformers loads it with ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4" | "fp4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)``: every
  linear but the output head a bitsandbytes ``Linear4bit`` (QLoRA's set-up as most users run it); needs
  ``bitsandbytes``. These names are also what an adapter trained on such a model records, however it was loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    quantize: Callable[[torch.Tensor, torch.Tensor | None], nn.Module] | None
    """``(weight (out, in), bias (out,) or None) -> layer``; None where transformers quantizes the model."""
    summary: str
    cached: bool
    """Whether the quantized base is cached on disk (lorakit's own format reloads bit for bit)."""
    transformers_config: Callable[[], Any] | None = None
    """The ``quantization_config`` transformers loads the model with, for schemes it quantizes itself."""


def _nf4(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return NFLinear(quantize_nf(weight, QLORA_NF4), bias)


def _bitsandbytes(scheme: str):
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"--quantize {scheme} uses bitsandbytes, which is not installed: pip install "
                          "'bitsandbytes>=0.50' (or use --quantize nf4, which needs nothing)") from None
    return bitsandbytes


def _int8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    bnb = _bitsandbytes("int8")
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
    layer.weight = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantizes the weight as it moves it


def _four_bit(quant_type: str) -> Callable[[], Any]:
    def config() -> Any:
        _bitsandbytes(f"bnb-{quant_type}")
        from transformers import BitsAndBytesConfig
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    return config


SCHEMES: dict[str, BaseScheme] = {
    "nf4": BaseScheme("nf4", _nf4, "lorakit's NF4, blocks of 64, double-quantized scales (QLoRA)", cached=True),
    "int8": BaseScheme("int8", _int8, "bitsandbytes' LLM.int8() (Linear8bitLt, outlier threshold 6)", cached=False),
    **{f"bnb-{kind}": BaseScheme(f"bnb-{kind}", None, f"bitsandbytes' {kind.upper()} Linear4bit, double-quantized, "
                                 "loaded by transformers (BitsAndBytesConfig)", cached=False,
                                 transformers_config=_four_bit(kind)) for kind in ("nf4", "fp4")},
}


def base_scheme(name: str) -> BaseScheme:
    """The scheme called ``name``; a :class:`ConfigError` lists the known ones."""
    if name not in SCHEMES:
        raise ConfigError(f"--quantize {name!r} is invalid: one of {', '.join(SCHEMES)}")
    return SCHEMES[name]
