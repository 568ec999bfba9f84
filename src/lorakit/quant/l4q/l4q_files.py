"""L4Q's quantized linears in one safetensors file: :func:`quantized_linears_writer`, :func:`load_quantized_linears`.

For every layer ``NAME`` (its module name in the model) the file holds ``NAME.codes`` (the ``out * in`` codes
packed tightly at ``bits`` bits by :func:`~lorakit.quant.code_packing.pack_codes`: uint8 (ceil(out in bits / 8),)),
``NAME.step`` and ``NAME.offset`` (float32 (out, G)) and, where the layer has one, ``NAME.bias``, with one
metadata entry ``lorakit.l4q``, a JSON object::

    {"format": 1, "layers": {NAME: {"bits": 4, "group_size": 128, "shape": [out, in], "bias": false}}}

Only safetensors is read, never a pickle. Loading checks everything before it returns (the tensors each layer
needs and no others, their dtypes and shapes, finite non-zero steps, finite offsets; every ``bits``-bit pattern
is a code, so a packed file cannot hold one out of range); a :class:`FormatError` names the file, the layer and
the tensor at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from lorakit.errors import ConfigError, FormatError
from lorakit.io.files import load_metadata_header, load_tensors, tensor_writer
from lorakit.quant.code_packing import pack_codes, packed_size, unpack_codes
from lorakit.quant.l4q.config import L4QConfig
from lorakit.quant.l4q.uniform_linear import UniformQuantizedLinear

METADATA_KEY = "lorakit.l4q"
FORMAT = 1
_FIELDS = {"bits", "group_size", "shape", "bias"}


def quantized_linears_writer(layers: Mapping[str, UniformQuantizedLinear]) -> Callable[[Path], None]:
    """A writer of ``layers`` (module name -> layer) in the layout of the module docstring."""
    tensors, described = {}, {}
    for name, layer in layers.items():
        tensors.update({f"{name}.codes": pack_codes(layer.codes, layer.config.bits),
                        f"{name}.step": layer.step, f"{name}.offset": layer.offset})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
        described[name] = {"bits": layer.config.bits, "group_size": layer.config.group_size,
                           "shape": [layer.out_features, layer.in_features], "bias": layer.bias is not None}
    return tensor_writer(tensors, {METADATA_KEY: json.dumps({"format": FORMAT, "layers": described})})


def _described(path: Path) -> dict:
    return load_metadata_header(path, METADATA_KEY, version=FORMAT, field="layers",
                                holds="a file of L4Q quantized linears")


def _config(entry: object, where: str) -> tuple[L4QConfig, list[int], bool]:
    if not isinstance(entry, dict) or set(entry) != _FIELDS:
        fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise FormatError(f"{where}: its description has fields {fields}, expected {sorted(_FIELDS)}")
    shape = entry["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise FormatError(f"{where}: shape {shape!r} is not [out, in] of positive integers")
    if not isinstance(entry["bias"], bool):
        raise FormatError(f"{where}: bias {entry['bias']!r} is not true or false")
    try:
        config = L4QConfig(bits=entry["bits"], group_size=entry["group_size"])
    except ConfigError as err:
        raise FormatError(f"{where}: {err}") from None
    return config, shape, entry["bias"]


def load_quantized_linears(path: str | Path) -> dict[str, UniformQuantizedLinear]:
    """Every layer of the file ``path`` (module name -> :class:`UniformQuantizedLinear`), checked first."""
    path = Path(path)
    stored = load_tensors(path)  # safetensors only: a pickle is refused, whatever its name
    layers, claimed = {}, set()
    for name, entry in _described(path).items():
        where = f"{path}: layer {name!r}"
        config, shape, has_bias = _config(entry, where)
        parts = ("codes", "step", "offset", *(("bias",) if has_bias else ()))
        missing = [part for part in parts if f"{name}.{part}" not in stored]
        if missing:
            raise FormatError(f"{where}: tensor {name + '.' + missing[0]!r} is missing")
        codes, step, offset = (stored[f"{name}.{part}"] for part in parts[:3])
        bias = stored[f"{name}.bias"] if has_bias else None
        claimed.update(f"{name}.{part}" for part in parts)
        expected = packed_size(shape[0] * shape[1], config.bits)
        if codes.dtype != torch.uint8 or list(codes.shape) != [expected]:
            raise FormatError(f"{where}: tensor {name + '.codes'!r} is {codes.dtype} of shape {list(codes.shape)}; "
                              f"the metadata's {shape} at {config.bits} bits packs into uint8 ({expected},)")
        codes = unpack_codes(codes, config.bits, shape[0] * shape[1]).view(shape)
        layers[name] = UniformQuantizedLinear(codes, step, offset, bias, config, where=str(path), prefix=f"{name}.")
    unclaimed = sorted(set(stored) - claimed)
    if unclaimed:
        raise FormatError(f"{path}: tensor {unclaimed[0]!r} belongs to no layer the metadata describes")
    return layers
