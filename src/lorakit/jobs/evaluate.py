"""``lorakit eval``: exact match, loss and perplexity of a base model, alone or with any directory
:func:`lorakit.load` reads (an adapter, a mixture, a merged or fully fine-tuned model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.data.source import load_examples
from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.io.directory_kinds import Loaded
from lorakit.io.loader import load
from lorakit.models import DEFAULT_MODEL, load_model


def load_directory(path: str | Path, base: str | None) -> tuple[Loaded, Any]:
    """The directory at ``path`` through :func:`lorakit.load`, into the model ``base`` names or (None) into
    the base the directory records; with the tokenizer of the model loaded."""
    if base is None:
        loaded = load(path)
        return loaded, loaded.tokenizer
    model, tokenizer = load_model(base)
    return load(path, model), tokenizer


def model_with_adapter(base: str | None, adapter: str | Path | None) -> tuple[nn.Module, Any]:
    """The model to run and its tokenizer: ``base`` (None: the default model) alone, or the directory
    ``adapter`` of any kind loaded into ``base`` (None: the base it records)."""
    if adapter is None:
        return load_model(base or DEFAULT_MODEL)
    loaded, tokenizer = load_directory(adapter, base)
    return loaded.model, tokenizer


def evaluate_adapter(data: str, *, base: str | None = None, adapter: str | Path | None = None,
                     split: str = "test", n: int | None = None, batch_size: int = 16,
                     progress: bool = False) -> EvalResult:
    """Exact match, loss and perplexity on ``data`` of the base model, or of the directory ``adapter`` (any
    kind) on ``base`` (None: the base the directory records, or the default model without ``adapter``)."""
    examples = load_examples(data, split=split, n=n)
    model, tokenizer = model_with_adapter(base, adapter)
    return evaluate(model, tokenizer, examples, batch_size=batch_size, progress=progress)
