"""An adapter exported as a GGUF LoRA file holds llama.cpp's names, shapes and alpha, and factors from which
llama.cpp's update ``(alpha / r) B A`` is the adapter's own, in the row order of the exported base model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError, ModelError
from lorakit.io.factors import read_adapter_factors
from lorakit.io.gguf_export import export_gguf
from lorakit.io.gguf_lora import export_gguf_lora
from tests.helpers import bpe_tokenizer, perturb, tiny_gpt2, tiny_llama

PLAIN = LoraConfig(rank=4, alpha=8, targets="all-linear")
#: rsLoRA and a rank pattern: scales other than alpha / r, which the file must fold into B.
RESCALED = LoraConfig(rank=4, alpha=8, targets="all-linear", use_rslora=True, rank_pattern={"v_proj": 2})
LLAMA_CPP_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
PROJECTIONS = tuple(LLAMA_CPP_NAMES.values())


def saved_adapter(directory: Path, config: LoraConfig = PLAIN) -> Path:
    """A perturbed adapter of shape ``config`` on the tiny Llama, saved to ``directory``."""
    model = tiny_llama()
    lorakit.attach(model, config)
    perturb(model, "default")
    return lorakit.save_adapter(model, directory)


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {tensor.name: np.asarray(tensor.data) for tensor in gguf.GGUFReader(path).tensors}


def test_the_file_holds_llama_cpp_names_shapes_and_alpha(tmp_path):
    config = tiny_llama().config
    out = export_gguf_lora(saved_adapter(tmp_path / "adapter"), tmp_path / "adapter.gguf", config=config)
    reader = gguf.GGUFReader(out)
    fields = {key: reader.fields[key].contents() for key in ("general.architecture", "general.type", "adapter.type")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    expected = {f"blk.{block}.{projection}.weight.lora_{factor}" for block in range(2) for projection in PROJECTIONS
                for factor in "ab"}
    shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}  # ggml's order
    assert set(shapes) == expected
    assert shapes["blk.0.attn_k.weight.lora_a"] == (64, 4)  # ne0 = d_in, ne1 = r
    assert shapes["blk.0.attn_k.weight.lora_b"] == (4, 32)  # ne0 = r, ne1 = d_out (2 key-value heads of 16)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (128, 4)
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F32}


@pytest.mark.parametrize("lora", [PLAIN, RESCALED], ids=["plain", "rslora-rank-pattern"])
def test_the_factors_are_the_adapters_once_the_row_order_and_alpha_over_r_are_undone(lora, tmp_path):
    config = tiny_llama().config
    adapter = saved_adapter(tmp_path / "adapter", lora)
    stored = tensors(export_gguf_lora(adapter, tmp_path / "adapter.gguf", config=config))
    alpha, unpermute = 8.0, LlamaTensorProcessor()._reverse_permute_weights  # transformers' GGUF reader's inverse
    for module, factors in read_adapter_factors(adapter).modules.items():
        block, projection = module.split(".")[2], module.split(".")[-1]
        name = f"blk.{block}.{LLAMA_CPP_NAMES[projection]}.weight"
        A, B = stored[f"{name}.lora_a"], stored[f"{name}.lora_b"]
        heads = {"q_proj": (4, 4), "k_proj": (4, 2)}.get(projection)
        B = unpermute(B, *heads) if heads else B
        rank = A.shape[0]
        np.testing.assert_array_equal(A, factors.A.float().numpy())
        np.testing.assert_allclose(alpha / rank * B, factors.scale * factors.B.float().numpy(), rtol=1e-6, atol=1e-7)


def test_base_file_plus_lora_file_is_the_merged_file(tmp_path):
    """What llama.cpp computes from the base GGUF and the LoRA file is the merged model's GGUF (to float16)."""
    adapter = saved_adapter(tmp_path / "adapter")
    base = export_gguf(tiny_llama(), bpe_tokenizer(), tmp_path / "base.gguf", progress=False)
    merged_model = lorakit.merge_and_unload(lorakit.load(adapter, tiny_llama()).model)
    merged = tensors(export_gguf(merged_model, bpe_tokenizer(), tmp_path / "merged.gguf", progress=False))
    lora = tensors(export_gguf_lora(adapter, tmp_path / "adapter.gguf", config=tiny_llama().config))
    base_tensors, alpha = tensors(base), 8.0
    for name in (f"blk.{block}.{projection}.weight" for block in range(2) for projection in PROJECTIONS):
        A, B = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        rebuilt = base_tensors[name].astype(np.float32) + alpha / A.shape[0] * (B @ A)
        np.testing.assert_allclose(rebuilt, merged[name].astype(np.float32), atol=2e-3, err_msg=name)


def test_an_embedding_adapter_is_refused_by_module(tmp_path):
    adapter = saved_adapter(tmp_path / "adapter", LoraConfig(rank=4, alpha=8, targets=("q_proj", "embed_tokens")))
    with pytest.raises(ConfigError, match="'model.embed_tokens'"):
        export_gguf_lora(adapter, tmp_path / "adapter.gguf", config=tiny_llama().config)
    assert not (tmp_path / "adapter.gguf").exists()


def test_an_existing_file_and_another_architecture_are_refused(tmp_path):
    adapter, out = saved_adapter(tmp_path / "adapter"), tmp_path / "adapter.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="exists"):
        export_gguf_lora(adapter, out, config=tiny_llama().config)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ModelError, match="'gpt2'"):
        export_gguf_lora(adapter, out, config=tiny_gpt2().config, force=True)
    assert out.read_bytes() == b"keep me"
    export_gguf_lora(adapter, out, config=tiny_llama().config, force=True)
    assert gguf.GGUFReader(out).fields["general.type"].contents() == "adapter"
