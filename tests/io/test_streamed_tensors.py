"""Reading safetensors tensor by tensor without a memory map: the same tensors as safetensors' own loader, in
file order, and a damaged file refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import FormatError
from lorakit.io.streamed_tensors import stream_tensors, tensor_count


def test_it_reads_what_safetensors_reads_for_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6).view(2, 3), "u8": torch.arange(7, dtype=torch.uint8),
               "flag": torch.tensor([True]), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"note": "kept apart"})
    streamed = dict(stream_tensors(tmp_path / "t.safetensors"))
    reference = load_file(tmp_path / "t.safetensors")
    assert streamed.keys() == reference.keys() and tensor_count(tmp_path / "t.safetensors") == 7
    for name, tensor in reference.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor)


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(FormatError, match="truncated"):
        list(stream_tensors(tmp_path / "cut.safetensors"))
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(FormatError, match="not a safetensors file"):
        list(stream_tensors(tmp_path / "pickle.safetensors"))
