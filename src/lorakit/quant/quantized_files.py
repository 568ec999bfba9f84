"""Quantized weights in safetensors files, reloaded bit for bit: :func:`save_quantized`, :func:`load_quantized`.

A file holds, for every weight ``NAME``, the tensors ``NAME.codes`` and ``NAME.scales`` (with double
quantization also ``NAME.scale_scales`` and ``NAME.scale_offset``; see
:mod:`lorakit.quant.quantized_tensor`), and one metadata entry ``lorakit.quant``, a JSON object:

    {"format": 1, "tensors": {NAME: {"shape": [out, in], "config": {NFConfig's fields}}}}

Writes are atomic (a temporary file beside the target, then one rename). Only safetensors is read, never
a pickle; loading checks every part (dtype, size, finite scales) and the config's fields before it
returns, and a :class:`FormatError` names the file, the weight and the part at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from lorakit.errors import FormatError
from lorakit.io.files import load_metadata_header, load_tensors, tensor_writer, write_atomically
from lorakit.quant.nf_config import NFConfig
from lorakit.quant.quantized_tensor import NFTensor

METADATA_KEY = "lorakit.quant"
FORMAT = 1
_ENTRY_FIELDS = {"shape", "config"}


def save_quantized(path: str | Path, tensors: Mapping[str, NFTensor]) -> None:
    """Write ``tensors`` (name -> :class:`NFTensor`) to the safetensors file ``path``, atomically."""
    write_atomically(Path(path), quantized_writer(tensors))


def quantized_writer(tensors: Mapping[str, NFTensor]) -> Callable[[Path], None]:
    """A writer of ``tensors`` as :func:`save_quantized` stores them, for a group of files written together."""
    stored = {f"{name}.{part}": value for name, tensor in tensors.items() for part, value in tensor.parts().items()}
    described = {name: {"shape": list(tensor.shape), "config": tensor.config.to_json()}
                 for name, tensor in tensors.items()}
    return tensor_writer(stored, {METADATA_KEY: json.dumps({"format": FORMAT, "tensors": described})})


def _described(path: Path) -> dict:
    return load_metadata_header(path, METADATA_KEY, version=FORMAT, field="tensors",
                                holds="a lorakit quantized file")


def load_quantized(path: str | Path) -> dict[str, NFTensor]:
    """Every weight of the file ``path`` (written by :func:`save_quantized`), checked; see the module docstring."""
    path = Path(path)
    stored = load_tensors(path)  # safetensors only: a pickle is refused, whatever its name
    described = _described(path)
    loaded, claimed = {}, set()
    for name, entry in described.items():
        where = f"{path}: weight {name!r}"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise FormatError(f"{where}: its description has fields {fields}, expected {sorted(_ENTRY_FIELDS)}")
        if not isinstance(entry["shape"], list):
            raise FormatError(f"{where}: shape {entry['shape']!r} is not a list")
        config = NFConfig.from_json(entry["config"], where)
        parts = {key[len(name) + 1:]: value for key, value in stored.items() if key.startswith(f"{name}.")}
        claimed.update(f"{name}.{part}" for part in parts)
        loaded[name] = NFTensor.from_parts(parts, tuple(entry["shape"]), config, where)
    unclaimed = sorted(set(stored) - claimed)
    if unclaimed:
        raise FormatError(f"{path}: tensor {unclaimed[0]!r} belongs to no weight the metadata describes")
    return loaded
