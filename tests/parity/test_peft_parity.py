"""Adapters move between lorakit and the real ``peft`` package with the same outputs, both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from tests.helpers import TinyConvNet, logits, perturb, tiny_gpt2, tiny_llama, token_batch

CASES = {
    "llama-all-linear": (tiny_llama, dict(rank=4, alpha=8, targets="all-linear")),
    "llama-embedding": (tiny_llama, dict(rank=4, alpha=8, targets=("embed_tokens", "v_proj"))),
    "gpt2-conv1d": (tiny_gpt2, dict(rank=4, alpha=16, targets=("c_attn", "c_proj", "c_fc"))),
    "llama-rslora": (tiny_llama, dict(rank=16, alpha=8, targets=("q_proj", "up_proj"), use_rslora=True)),
    "llama-patterns": (tiny_llama, dict(rank=8, alpha=8, targets=("q_proj", "o_proj", "down_proj"),
                                        rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 3},
                                        alpha_pattern={"o_proj": 32})),
    "llama-regex": (tiny_llama, dict(rank=4, alpha=4, targets=r".*layers\.1\.mlp\.(gate|up)_proj")),
}

PEFT_NAMES = {"rank": "r", "alpha": "lora_alpha", "targets": "target_modules", "use_rslora": "use_rslora",
              "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}


def peft_config(options: dict) -> peft.LoraConfig:
    kwargs = {PEFT_NAMES[k]: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    return peft.LoraConfig(init_lora_weights=False, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_lorakit_adapter_loads_in_peft_with_the_same_logits(case, tmp_path):
    make_model, options = CASES[case]
    ids = token_batch()
    model = make_model()
    lorakit.attach(model, LoraConfig(**options))
    perturb(model, "default", seed=3)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model(), tmp_path).eval()
    assert not torch.allclose(logits(make_model(), ids), expected, atol=1e-3)
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit_with_the_same_logits(case, tmp_path):
    make_model, options = CASES[case]
    ids = token_batch()
    torch.manual_seed(7)
    theirs = peft.get_peft_model(make_model(), peft_config(options)).eval()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = make_model()
    torch.manual_seed(8)  # a different seed: nothing may depend on fresh random initialisation
    lorakit.load_adapter(model, tmp_path)
    assert not torch.allclose(logits(make_model(), ids), expected, atol=1e-3)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_conv2d_round_trips_through_peft(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    model = TinyConvNet()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("conv1", "conv2")))
    perturb(model, "default")
    with torch.no_grad():
        expected = model(x)
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(TinyConvNet(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = TinyConvNet()
    lorakit.load_adapter(back, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)


def test_files_keys_and_config_fields_are_peft_s(tmp_path):
    options = dict(rank=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"))
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(**options))
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.get_peft_model(tiny_llama(), peft_config(options))
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors", "lorakit.json"]
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    # PEFT also stores a copy of a targeted embedding's base weight; lorakit never stores base weights.
    theirs_tensors = {k: v for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()
                      if not k.endswith(".base_layer.weight")}
    assert {k: v.shape for k, v in ours_tensors.items()} == {k: v.shape for k, v in theirs_tensors.items()}
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours_config) == set(theirs_config)
    for field in ("r", "lora_alpha", "peft_type", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                  "fan_in_fan_out", "lora_dropout"):
        assert ours_config[field] == theirs_config[field], field
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])


def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    ids = token_batch(rows=4)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_llama(), peft_config(dict(rank=4, alpha=8, targets=("q_proj", "v_proj"))))
    theirs.add_adapter("other", peft_config(dict(rank=2, alpha=2, targets=("k_proj", "v_proj"))))
    theirs.eval()
    with torch.no_grad():
        expected = theirs(ids, adapter_names=["default", "__base__", "other", "default"]).logits
    theirs.save_pretrained(tmp_path)  # "default" at the top, "other" in a subdirectory
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path, "default")
    lorakit.load_adapter(model, tmp_path / "other", "other")
    mixed = logits(model, ids, adapter_per_row=["default", None, "other", "default"])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
