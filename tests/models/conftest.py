"""Fixtures for tests/models: a tiny random Llama saved to disk (the real model is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 128


def save_tiny_model(directory: Path) -> None:
    """Save a tiny random Llama (hidden 64, 2 layers) and a word-level tokenizer with no pad."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=TINY_VOCAB,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    vocab = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A directory holding the tiny model and its tokenizer."""
    directory = tmp_path / "tiny"
    save_tiny_model(directory)
    return directory


@pytest.fixture
def tiny_saver() -> Callable[[Path], None]:
    """The function that writes the tiny model, for tests standing it in for the GGUF conversion."""
    return save_tiny_model
