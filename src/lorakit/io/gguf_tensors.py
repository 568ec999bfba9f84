"""How each tensor of an exported model is stored: the quantization a file is asked for, and what a tensor
gets when it cannot take it (vectors stay float32; matrices whose rows do not split into the quantization's
blocks stay float16). The output head (the embeddings, when tied to them) keeps at least 8 bits, as llama.cpp's
own quantizer keeps it at a higher precision than the rest (Q6_K there, which the gguf package cannot write).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class Quantization:
    """One ``--quant`` choice: the type of its matrices, of the output head, and the file type it declares."""

    tensor_type: gguf.GGMLQuantizationType
    head_type: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


QUANTIZATIONS = {
    "f16": Quantization(gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": Quantization(gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q8_0,
                         gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": Quantization(gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0,
                         gguf.LlamaFileType.MOSTLY_Q4_0),
}
"""The quantizations an export writes, by the name the command line uses."""


def quantization(name: str) -> Quantization:
    """The :data:`QUANTIZATIONS` entry ``name``; another name is refused with the choices."""
    if name not in QUANTIZATIONS:
        raise ConfigError(f"quantization {name!r} is not one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[name]


def storage_type(shape: tuple[int, ...], quant: Quantization, *, head: bool = False) -> gguf.GGMLQuantizationType:
    """The type a tensor of ``shape`` (PyTorch's order: rows last) is stored as under ``quant``; ``head``: the
    tensor is the output head."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    wanted = quant.head_type if head else quant.tensor_type
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def encode(tensor: torch.Tensor, quant: Quantization, *, head: bool = False
           ) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``tensor`` as the bytes (or floats) GGUF stores for it under ``quant``, with their type (``head``: the
    tensor is the output head)."""
    values = tensor.detach().to("cpu", torch.float32).numpy()
    tensor_type = storage_type(tuple(values.shape), quant, head=head)
    return gguf.quants.quantize(values, tensor_type), tensor_type
