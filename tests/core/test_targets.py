"""Target matching, the dry run, and its errors."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig
from tests.helpers import TinyConvNet, tiny_gpt2, tiny_llama

LLAMA_LINEARS = {f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def planned(model, **config):
    return {p.name for p in lorakit.plan(model, LoraConfig(**config))}


def test_all_linear_is_every_linear_but_the_output_head():
    assert planned(tiny_llama(), targets="all-linear") == LLAMA_LINEARS


def test_all_linear_finds_gpt2_conv1d_layers():
    names = planned(tiny_gpt2(), targets="all-linear")
    assert names == {f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_names_match_whole_module_names_or_their_last_parts():
    assert planned(tiny_llama(), targets=("q_proj", "model.layers.1.mlp.up_proj")) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    # "proj" is not the last part of any name: suffixes match at dots only.
    with pytest.raises(lorakit.TargetError):
        planned(tiny_llama(), targets=("proj",))


def test_regex_matches_the_full_name():
    assert planned(tiny_llama(), targets=r".*\.1\.self_attn\.(q|v)_proj") == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_exclude_removes_matches():
    names = planned(tiny_llama(), targets="all-linear", exclude=("down_proj", "model.layers.0.self_attn.q_proj"))
    assert names == LLAMA_LINEARS - {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                     "model.layers.0.self_attn.q_proj"}


def test_nothing_matched_lists_the_candidates():
    with pytest.raises(lorakit.TargetError) as info:
        planned(tiny_llama(), targets=("query_key_value",))
    message = str(info.value)
    assert "'query_key_value'" in message or "query_key_value" in message
    for candidate in ("q_proj", "down_proj", "embed_tokens", "lm_head"):
        assert candidate in message


def test_unsupported_type_is_named():
    with pytest.raises(lorakit.TargetError, match="'model.layers.0.input_layernorm' has type LlamaRMSNorm"):
        planned(tiny_llama(), targets=("model.layers.0.input_layernorm",))


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(lorakit.TargetError, match="groups=2"):
        planned(model, targets=("0",))


def test_dry_run_reports_rank_alpha_scale_and_shape():
    plans = {p.name: p for p in lorakit.plan(tiny_llama(), LoraConfig(
        rank=8, alpha=16, targets=("q_proj", "embed_tokens"), rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"embed_tokens": 4}))}
    q0, q1, emb = (plans["model.layers.0.self_attn.q_proj"], plans["model.layers.1.self_attn.q_proj"],
                   plans["model.embed_tokens"])
    assert (q0.layer_type, q0.weight_shape, q0.rank, q0.alpha, q0.scale) == ("Linear", (64, 64), 8, 16, 2.0)
    assert (q1.rank, q1.scale) == (2, 8.0)
    assert (emb.layer_type, emb.weight_shape, emb.rank, emb.alpha, emb.scale) == ("Embedding", (128, 64), 8, 4, 0.5)


def test_dry_run_changes_nothing():
    model = tiny_llama()
    before = repr(model)
    lorakit.plan(model, LoraConfig())
    assert repr(model) == before and not hasattr(model, "lorakit_state")


def test_rslora_scale_is_alpha_over_sqrt_rank():
    config = LoraConfig(rank=16, alpha=8, use_rslora=True)
    assert config.scale_for("anything") == 2.0
    assert LoraConfig(rank=16, alpha=8).scale_for("anything") == 0.5


def test_failed_attach_leaves_the_model_untouched():
    model = tiny_llama()
    before = repr(model)
    with pytest.raises(lorakit.TargetError):
        lorakit.attach(model, LoraConfig(targets=("nothing_here",)))
    assert repr(model) == before and not hasattr(model, "lorakit_state")


def test_conv_targets_wrap_conv2d():
    assert planned(TinyConvNet(), targets=("conv1", "conv2")) == {"conv1", "conv2"}


@pytest.mark.parametrize("field, value, fragment", [
    ("rank", 0, "rank=0"), ("rank", 2.5, "rank=2.5"), ("alpha", -1, "alpha=-1"),
    ("dropout", 1.0, "dropout=1.0"), ("init", "pissa", "init='pissa'"),
    ("targets", "(", "not a valid regular expression"), ("targets", (), "targets=()"),
    ("exclude", "all-linear", "exclude='all-linear'"), ("rank_pattern", {"q": 0}, "rank_pattern\\['q'\\]"),
])
def test_config_errors_name_the_field(field, value, fragment):
    with pytest.raises(lorakit.ConfigError, match=fragment):
        LoraConfig(**{field: value})
