"""NFConfig's validation and the storage cost formula b + b0/B0 + b1/(B0 B1)."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError, FormatError
from lorakit.quant import NFConfig, bits_per_parameter, quantize_nf


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("bits", 5, "2, 3, 4, 8"), ("bits", 4.0, "2, 3, 4, 8"), ("block_size", 48, "16, 32, 64, 128, 256"),
    ("scale_bits", 1, "None, 2, 3, 4, 8"), ("scale_block_size", 32, "16, 64, 256"),
    ("scale_dtype", "fp64", "'fp32', 'fp16', 'bf16'"), ("bits", True, "2, 3, 4, 8"),
])
def test_a_bad_field_is_named_with_its_allowed_values(field, value, allowed):
    with pytest.raises(ConfigError) as caught:
        NFConfig(**{field: value})
    assert f"NFConfig.{field}={value!r}" in str(caught.value) and allowed in str(caught.value)


def test_bits_per_parameter_follows_the_formula():
    assert bits_per_parameter(NFConfig()) == 4 + 32 / 64
    assert bits_per_parameter(NFConfig(bits=3, block_size=16)) == 3 + 32 / 16
    assert bits_per_parameter(NFConfig(scale_bits=8)) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert bits_per_parameter(NFConfig(bits=2, block_size=16, scale_bits=3, scale_block_size=16,
                                       scale_dtype="bf16")) == pytest.approx(2 + 3 / 16 + 16 / (16 * 16))


def test_double_quant_saves_what_the_formula_says():
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))  # 1024 blocks of 64: no padding
    plain, double = NFConfig(), NFConfig(scale_bits=8)
    assert bits_per_parameter(double) < bits_per_parameter(plain)
    for config in (plain, double):
        offset_bits = 32 if config.double_quant else 0  # the one fp32 mean, per tensor
        assert quantize_nf(weight, config).nbytes * 8 == bits_per_parameter(config) * weight.numel() + offset_bits


def test_json_round_trip_and_refusals():
    config = NFConfig(bits=3, scale_bits=4, scale_block_size=64, scale_dtype="fp16")
    assert NFConfig.from_json(config.to_json(), "here") == config
    with pytest.raises(FormatError, match=r"unknown fields \['group'\]"):
        NFConfig.from_json({**config.to_json(), "group": 1}, "here")
    with pytest.raises(FormatError, match="NFConfig.bits=7"):
        NFConfig.from_json({**config.to_json(), "bits": 7}, "here")
