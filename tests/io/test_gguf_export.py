"""A merged model exported as GGUF reads back through transformers' GGUF loader as the same model (f16: the
weights exactly as float16, so the q/k row order is undone exactly); quantized files keep their vectors in
float32; the tokenizer's fields round-trip; existing files, other architectures and unmerged models are refused.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.errors import ConfigError, ModelError, StateError
from lorakit.io.gguf_export import export_gguf
from lorakit.io.gguf_tensors import QUANTIZATIONS, storage_type
from tests.helpers import (
    BPE_SPECIALS,
    VOCAB,
    adapted,
    bpe_tokenizer,
    char_tokenizer,
    logits,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)

TEXT = "the cat sat on the mat\n"


def tiny_llama_tied() -> LlamaForCausalLM:
    """The tiny Llama's configuration with the output head tied to the embeddings (as SmolLM2's is)."""
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def merged(make=tiny_llama) -> LlamaForCausalLM:
    """``make()`` with a perturbed all-linear adapter merged into it."""
    return lorakit.merge_and_unload(adapted(make))


def exported(model, tmp_path, quant: str = "f16") -> tuple[LlamaForCausalLM, gguf.GGUFReader]:
    """``model`` written to ``tmp_path/model.gguf`` and read back by transformers and by gguf's reader."""
    out = export_gguf(model, bpe_tokenizer(), tmp_path / "model.gguf", quant=quant, progress=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    return back, gguf.GGUFReader(out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_llama_tied], ids=["untied", "tied"])
def test_an_f16_export_reads_back_as_the_merged_model_in_float16(make, tmp_path):
    model = merged(make)
    back, reader = exported(model, tmp_path)
    reread = back.state_dict()
    for key, weight in model.state_dict().items():
        assert torch.equal(reread[key], weight.half().float()), key
    names = {tensor.name for tensor in reader.tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)
    ids = token_batch()
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-2, rtol=1e-2)


def test_the_metadata_are_the_models_and_the_tokenizers(tmp_path):
    model = merged()
    _, reader = exported(model, tmp_path)
    config, tokenizer = model.config, bpe_tokenizer()

    def value(key: str):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama" and value("general.type") == "model"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    expected = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128, "context_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": VOCAB,
                "rope.dimension_count": 16}
    assert {key: value(f"llama.{key}") for key in expected} == expected
    assert value("llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    tokens = value("tokenizer.ggml.tokens")
    assert value("tokenizer.ggml.model") == "gpt2" and len(tokens) == VOCAB
    assert tokens[:3] == BPE_SPECIALS and tokens[-1] == f"[PAD{VOCAB - 1}]"
    types = value("tokenizer.ggml.token_type")
    assert types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]
    assert types[-1] == gguf.TokenType.UNUSED
    assert value("tokenizer.ggml.merges") == ["Ġ t", "h e", "Ġt he"]
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert value("tokenizer.chat_template") == tokenizer.chat_template


def test_the_tokenizer_reads_back_with_the_same_ids(tmp_path):
    out = export_gguf(merged(), bpe_tokenizer(), tmp_path / "model.gguf", progress=False)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert back(TEXT).input_ids == bpe_tokenizer()(TEXT).input_ids
    assert back.eos_token == "<|im_end|>"


@pytest.mark.parametrize(("quant", "weight_error"), [("q8_0", 0.01), ("q4_0", 0.15)])
def test_a_quantized_export_quantizes_the_matrices_and_keeps_the_norms_in_float32(quant, weight_error, tmp_path):
    model = merged()
    back, reader = exported(model, tmp_path, quant)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == QUANTIZATIONS[quant].tensor_type
    assert types["blk.1.ffn_down.weight"] == QUANTIZATIONS[quant].tensor_type
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["output.weight"] == QUANTIZATIONS[quant].head_type == gguf.GGMLQuantizationType.Q8_0
    assert reader.fields["general.file_type"].contents() == QUANTIZATIONS[quant].file_type
    reread = back.state_dict()
    for key, weight in model.state_dict().items():
        error = reread[key] - weight  # vectors are exact; matrices within the quantization's relative error
        assert error.norm() <= (weight_error if weight.dim() == 2 else 0.0) * weight.norm(), key
    assert torch.isfinite(logits(back, token_batch())).all()


def test_rows_that_do_not_split_into_blocks_stay_float16_vectors_float32_and_the_head_8_bits():
    q8_0 = QUANTIZATIONS["q8_0"]
    assert storage_type((8, 64), q8_0) == gguf.GGMLQuantizationType.Q8_0
    assert storage_type((8, 48), q8_0) == gguf.GGMLQuantizationType.F16
    assert storage_type((48,), q8_0) == gguf.GGMLQuantizationType.F32
    assert storage_type((8, 64), QUANTIZATIONS["q4_0"]) == gguf.GGMLQuantizationType.Q4_0
    assert storage_type((8, 64), QUANTIZATIONS["q4_0"], head=True) == gguf.GGMLQuantizationType.Q8_0


def test_an_existing_file_is_kept_unless_forced(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="exists; pass --force"):
        export_gguf(merged(), bpe_tokenizer(), out, progress=False)
    assert out.read_bytes() == b"keep me"
    export_gguf(merged(), bpe_tokenizer(), out, force=True, progress=False)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left beside it


def test_another_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(ModelError, match="'gpt2'"):
        export_gguf(tiny_gpt2(), bpe_tokenizer(), tmp_path / "model.gguf", progress=False)
    assert not (tmp_path / "model.gguf").exists()


def test_a_model_with_adapters_still_attached_is_refused(tmp_path):
    with pytest.raises(StateError, match="merge them first"):
        export_gguf(adapted(tiny_llama), bpe_tokenizer(), tmp_path / "model.gguf", progress=False)


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path):
    with pytest.raises(ModelError, match="WordLevel"):
        export_gguf(merged(), char_tokenizer(), tmp_path / "model.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_the_query_rows_are_reordered_as_llama_cpp_orders_them(tmp_path):
    model = merged()
    _, reader = exported(model, tmp_path)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    rows = np.asarray(stored.data, dtype=np.float32)  # (d_out, d_in), llama.cpp's row order
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().half().float().numpy()
    head = 16
    assert np.array_equal(rows[1], weight[head // 2])  # row 1 of head 0 is its second half's first row
    assert np.array_equal(rows[0], weight[0]) and not np.array_equal(rows, weight)
