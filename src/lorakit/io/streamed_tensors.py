"""Reading a safetensors file one tensor at a time with plain reads, never a memory map.

``safetensors.safe_open`` maps the whole file: every page a read touches then counts toward the process's
resident memory until the file is closed, so streaming a checkpoint through it peaks at the checkpoint's size.
:func:`stream_tensors` parses the header itself (8 bytes of little-endian length, a JSON object of
``name -> {dtype, shape, data_offsets}``, then the data) and reads each tensor into memory of its own, in file
order, so only the tensors the caller still holds stay resident.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from lorakit.errors import FormatError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


def _header(handle, path: Path) -> tuple[dict, int]:
    raw = handle.read(8)
    if len(raw) != 8:
        raise FormatError(f"{path}: too short to be a safetensors file")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER:
        raise FormatError(f"{path}: claims a {length}-byte header; it is not a safetensors file")
    try:
        header = json.loads(handle.read(length))
    except ValueError as error:
        raise FormatError(f"{path}: its header is not valid JSON ({error}); it is not a safetensors file") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def stream_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(name, tensor)`` of the safetensors file ``path``, in the order the data lies in the file."""
    path = Path(path)
    with path.open("rb") as handle:
        header, start = _header(handle, path)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise FormatError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which lorakit does "
                                  f"not read (one of {', '.join(DTYPES)})")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected:
                raise FormatError(f"{path}: tensor {name!r} claims {end - begin} bytes for shape {shape} of "
                                  f"{entry['dtype']}, which needs {expected}")
            buffer = bytearray(expected)
            handle.seek(start + begin)
            if handle.readinto(buffer) != expected:
                raise FormatError(f"{path}: the file ends inside tensor {name!r}; it is truncated")
            tensor = torch.frombuffer(buffer, dtype=dtype) if expected else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(shape)


def tensor_count(path: str | Path) -> int:
    """How many tensors the safetensors file ``path`` holds (its header only is read)."""
    path = Path(path)
    with path.open("rb") as handle:
        return len(_header(handle, path)[0])
