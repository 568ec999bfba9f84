"""The default model with a merged adapter, exported as GGUF and read back through transformers' GGUF loader:
f16 gives the merged model's logits to float16 precision; q8_0 and q4_0 load and stay close in their argmax."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import LoraConfig
from lorakit.io.gguf_export import export_gguf
from lorakit.models import smollm2
from tests.helpers import logits, perturb

pytestmark = pytest.mark.real_model

PROMPT = "Reverse the word: lantern. Then tell me a short story about a cat."
#: Per quantization: the largest logit difference allowed, relative to the largest logit, and the least share of
#: positions whose argmax must agree (measured: f16 0.0014 / 100%, q8_0 0.033 / 96%, q4_0 0.57 / 66%).
BOUNDS = {"f16": (5e-3, 1.0), "q8_0": (0.1, 0.85), "q4_0": (1.0, 0.4)}


@pytest.fixture(scope="module")
def merged_real(real_model):
    """A copy of the default model with a perturbed all-linear adapter merged in, its tokenizer and a prompt."""
    model, tokenizer = real_model
    adapted = lorakit.attach(copy.deepcopy(model), LoraConfig(rank=8, alpha=16, targets="all-linear"))
    perturb(adapted, "default", std=0.02)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return lorakit.merge_and_unload(adapted), tokenizer, ids


@pytest.mark.parametrize("quant", sorted(BOUNDS))
def test_the_exported_default_model_gives_the_merged_logits(quant, merged_real, tmp_path):
    model, tokenizer, ids = merged_real
    out = export_gguf(model, tokenizer, tmp_path / "model.gguf", quant=quant, progress=False,
                      pre_tokenizer=smollm2.LLAMA_CPP_PRE_TOKENIZER)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    expected, found = logits(model, ids), logits(back, ids)
    relative_difference = ((found - expected).abs().max() / expected.abs().max()).item()
    argmax_agreement = (found.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"{quant}: max |logit difference| / max |logit| {relative_difference:.4f}, "
          f"argmax agreement {argmax_agreement:.0%}")
    largest_difference, least_agreement = BOUNDS[quant]
    assert torch.isfinite(found).all()
    assert relative_difference < largest_difference and argmax_agreement >= least_agreement
