"""The ``l4q-model`` directory kind: a whole model whose adapted linears L4Q quantized, for :func:`lorakit.load`.

:func:`save_l4q_model` writes a model :func:`~lorakit.quant.l4q.l4q_model.finalize_l4q` finalized in the layout of
:mod:`lorakit.quant.quantized_model_dir`, its ``UniformQuantizedLinear`` layers (codes, steps, offsets and biases)
in ``quantized_linears.safetensors`` (:mod:`lorakit.quant.l4q.l4q_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import StateError
from lorakit.quant.l4q.l4q_files import load_quantized_linears, quantized_linears_writer
from lorakit.quant.l4q.l4q_linear import L4QLinear
from lorakit.quant.l4q.uniform_linear import UniformQuantizedLinear
from lorakit.quant.quantized_model_dir import (
    QuantizedLayers,
    StoredLayer,
    register_quantized_model_kind,
    save_quantized_model,
)

L4Q_MODEL_KIND = "l4q-model"


def _read(path: Path) -> dict[str, StoredLayer]:
    return {name: StoredLayer((layer.out_features, layer.in_features), f"{name}.codes",
                              {"bits": layer.config.bits, "group_size": layer.config.group_size},
                              lambda _found, layer=layer: layer)
            for name, layer in load_quantized_linears(path).items()}


L4Q_LAYERS = QuantizedLayers(
    kind=L4Q_MODEL_KIND, holds="a whole model whose linears L4Q quantized (integer codes with per-group steps)",
    layer_type=UniformQuantizedLinear, write=quantized_linears_writer, read=_read)


def save_l4q_model(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the finalized L4Q ``model`` (and ``tokenizer``, unless None) to ``out_dir`` as an ``l4q-model``."""
    if any(isinstance(m, L4QLinear) for m in model.modules()):
        raise StateError("the model still holds L4QLinear layers; call finalize_l4q(model) before saving it")
    return save_quantized_model(model, tokenizer, out_dir, L4Q_LAYERS, origin="l4q")


L4Q_MODEL = register_quantized_model_kind(L4Q_LAYERS)
