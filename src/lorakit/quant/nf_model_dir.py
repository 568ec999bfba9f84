"""The ``nf-model`` directory kind: a whole model whose linears are lorakit's NormalFloat ``NFLinear`` layers.

A quantized merge (:mod:`lorakit.quant.quantized_merge`) writes one; :func:`lorakit.load` reads it back with the
same logits, bit for bit. The layout is :mod:`lorakit.quant.quantized_model_dir`'s: the layers' NF weights in
``quantized_linears.safetensors`` (:mod:`lorakit.quant.quantized_files`, every part checked on load), their biases
in ``model.safetensors`` with the other tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_files import load_quantized, quantized_writer
from lorakit.quant.quantized_model_dir import (
    QuantizedLayers,
    StoredLayer,
    register_quantized_model_kind,
    save_quantized_model,
)
from lorakit.quant.quantized_tensor import OPTIONAL_PARTS

NF_MODEL_KIND = "nf-model"


def _read(path: Path) -> dict[str, StoredLayer]:
    return {name: StoredLayer(tuple(weight.shape), f"{name}.codes", weight.config.to_json(),
                              lambda found, weight=weight: NFLinear(weight, found.bias))
            for name, weight in load_quantized(path).items()}


NF_LAYERS = QuantizedLayers(
    kind=NF_MODEL_KIND, holds="a whole model whose linears are NormalFloat-quantized (lorakit's NFLinear)",
    layer_type=NFLinear, write=lambda layers: quantized_writer({n: m.quantized for n, m in layers.items()}),
    read=_read, stored=frozenset({"codes", "scales", *OPTIONAL_PARTS}))


def save_nf_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, origin: str) -> Path:
    """Write ``model`` (its quantized linears ``NFLinear``; ``tokenizer`` unless None) as an ``nf-model``."""
    return save_quantized_model(model, tokenizer, out_dir, NF_LAYERS, origin=origin)


NF_MODEL = register_quantized_model_kind(NF_LAYERS)
