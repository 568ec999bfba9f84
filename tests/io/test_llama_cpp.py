"""llama.cpp itself (through ``llama-cpp-python``) runs what lorakit exports: a merged model as GGUF gives the
merged model's logits, at each quantization within its error; the base GGUF plus the adapter's GGUF LoRA file gives
the merged model's logits too. Skipped, saying why, where llama-cpp-python is not installed (``make venv`` builds
it from source when a C++ compiler and CMake are there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.io.gguf_export import export_gguf
from lorakit.io.gguf_lora import export_gguf_lora
from tests.helpers import adapted, bpe_tokenizer, logits, tiny_llama, token_batch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here (make venv builds it "
                                "from source; it needs a C++ compiler and CMake)")

IDS = token_batch(1, 24)[0]
FILE_ERROR = {"f16": 5e-3, "q8_0": 0.05, "q4_0": 0.4}
"""The largest logit difference between llama.cpp and transformers reading the same file (measured 1.3e-3, 1.2e-2
and 0.17 on the tiny model's logits of up to 0.6: for quantized files llama.cpp also rounds the activations to 8
bits in its matrix products)."""
F16_ERROR = 5e-3
"""The largest logit difference from the fp32 merged model at f16 (measured 1.5e-3; the LoRA file: 1.0e-3)."""


def llama_cpp_logits(model_file: Path, lora_file: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits (T, vocab) for :data:`IDS` from ``model_file`` (with the LoRA file, if given)."""
    llm = llama_cpp.Llama(model_path=str(model_file), lora_path=None if lora_file is None else str(lora_file),
                          n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(IDS.tolist())
    return torch.from_numpy(np.array(llm.scores[:len(IDS)], dtype=np.float32))


def model_logits(model) -> torch.Tensor:
    return logits(model, IDS[None])[0]


@pytest.mark.parametrize("quant", list(FILE_ERROR))
def test_llama_cpp_runs_the_exported_merged_model(quant, tmp_path):
    model = lorakit.merge_and_unload(adapted(tiny_llama))
    path = export_gguf(model, bpe_tokenizer(), tmp_path / "model.gguf", quant=quant, progress=False)
    found = llama_cpp_logits(path)
    file = model_logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32))
    merged = model_logits(model)
    quantization, runtime = (file - merged).abs().max().item(), (found - file).abs().max().item()
    print(f"{quant}: llama.cpp - the file read by transformers {runtime:.2e}, the file - the fp32 merged model "
          f"{quantization:.2e}, llama.cpp - the merged model {(found - merged).abs().max().item():.2e}")
    assert runtime <= FILE_ERROR[quant]
    assert (found - merged).abs().max().item() <= quantization + FILE_ERROR[quant]
    if quant == "f16":
        assert (found - merged).abs().max().item() <= F16_ERROR


def test_llama_cpp_applies_the_gguf_lora_file_to_the_base_as_the_merged_model(tmp_path):
    model = adapted(tiny_llama)
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    base = export_gguf(tiny_llama(), bpe_tokenizer(), tmp_path / "base.gguf", progress=False)
    lora = export_gguf_lora(adapter, tmp_path / "adapter.gguf", config=tiny_llama().config)
    expected = model_logits(lorakit.merge_and_unload(model))
    with_lora, without = llama_cpp_logits(base, lora), llama_cpp_logits(base)
    error = (with_lora - expected).abs().max().item()
    print(f"base + LoRA file: largest logit difference from the fp32 merged model {error:.2e}")
    assert error <= F16_ERROR and (without - expected).abs().max().item() > 10 * F16_ERROR
