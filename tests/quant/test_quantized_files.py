"""safetensors storage of NF weights: bit-exact reloads and every refusal, naming the part at fault."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import FormatError
from lorakit.quant import NFConfig, load_quantized, quantize_nf, save_quantized
from lorakit.quant.quantized_files import METADATA_KEY

WEIGHTS = {
    "plain": (torch.randn(24, 40, generator=torch.Generator().manual_seed(0)), NFConfig(bits=3, block_size=32)),
    "double": (torch.randn(64, 70, generator=torch.Generator().manual_seed(1)),
               NFConfig(bits=2, block_size=16, scale_bits=4, scale_block_size=64, scale_dtype="bf16")),
}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_quantized(path, {name: quantize_nf(weight, config) for name, (weight, config) in WEIGHTS.items()})
    return path


def _rewrite(path, change_tensors=None, change_header=None):
    """Rewrite ``path`` with its tensors and metadata header edited in place."""
    tensors = load_file(str(path))
    header = json.loads(safe_open(str(path), "pt").metadata()[METADATA_KEY])
    if change_tensors:
        change_tensors(tensors)
    if change_header:
        change_header(header)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})


def test_save_and_load_are_bit_exact(saved, tmp_path):
    loaded = load_quantized(saved)
    assert set(loaded) == set(WEIGHTS)
    for name, (weight, config) in WEIGHTS.items():
        original = quantize_nf(weight, config)
        assert loaded[name].config == config and loaded[name].shape == tuple(weight.shape)
        assert all(torch.equal(loaded[name].parts()[p], v) for p, v in original.parts().items())
        assert torch.equal(loaded[name].dequantize(), original.dequantize())
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]  # no temporary left behind


def test_a_failed_write_leaves_the_previous_file(saved):
    before = saved.read_bytes()
    with pytest.raises(AttributeError):
        save_quantized(saved, {"broken": object()})
    assert saved.read_bytes() == before


def test_a_nan_scale_is_refused(saved):
    _rewrite(saved, lambda t: t["plain.scales"].__setitem__(2, float("nan")))
    with pytest.raises(FormatError, match=r"weight 'plain'\.scales: holds non-finite"):
        load_quantized(saved)


def test_an_inf_second_level_scale_is_refused(saved):
    _rewrite(saved, lambda t: t["double.scale_scales"].__setitem__(0, float("inf")))
    with pytest.raises(FormatError, match=r"'double'\.scale_scales: holds non-finite"):
        load_quantized(saved)


def test_codes_out_of_uint8_range_are_refused(saved):
    # packed bytes cannot hold an out-of-range code (every k-bit pattern is one); a wider dtype could
    _rewrite(saved, lambda t: t.__setitem__("plain.codes", t["plain.codes"].to(torch.int16).fill_(300)))
    with pytest.raises(FormatError, match=r"'plain'\.codes: is torch.int16"):
        load_quantized(saved)


def test_a_size_that_does_not_fit_the_shape_is_refused(saved):
    _rewrite(saved, change_header=lambda h: h["tensors"]["plain"].__setitem__("shape", [24, 41]))
    with pytest.raises(FormatError, match=r"'plain'\.codes: is torch.uint8 of shape \[360\], expected"):
        load_quantized(saved)


def test_unknown_config_fields_are_refused(saved):
    _rewrite(saved, change_header=lambda h: h["tensors"]["plain"]["config"].__setitem__("zero_point", 0))
    with pytest.raises(FormatError, match=r"weight 'plain'.*unknown fields \['zero_point'\]"):
        load_quantized(saved)


def test_a_missing_part_is_refused(saved):
    _rewrite(saved, lambda t: t.pop("double.scale_offset"))
    with pytest.raises(FormatError, match=r"'double': holds the parts \['codes', 'scale_scales', 'scales'\]"):
        load_quantized(saved)


def test_an_extra_tensor_is_refused(saved):
    _rewrite(saved, lambda t: t.__setitem__("stray", torch.zeros(1)))
    with pytest.raises(FormatError, match="tensor 'stray' belongs to no weight"):
        load_quantized(saved)


def test_a_pickle_is_never_read(tmp_path):
    tensors = quantize_nf(*WEIGHTS["plain"]).parts()
    for name in ("weights.safetensors", "weights.pt"):
        torch.save({f"plain.{k}": v for k, v in tensors.items()}, tmp_path / name)
        with pytest.raises(FormatError, match="not a readable safetensors file|is a pickle file"):
            load_quantized(tmp_path / name)


def test_a_truncated_file_is_refused(saved):
    saved.write_bytes(saved.read_bytes()[:-50])
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        load_quantized(saved)


def test_a_plain_safetensors_file_is_not_a_quantized_one(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="has no 'lorakit.quant' metadata"):
        load_quantized(tmp_path / "plain.safetensors")
