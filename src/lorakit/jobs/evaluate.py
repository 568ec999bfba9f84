"""``lorakit eval``: exact match, loss and perplexity of a base model, alone or with any directory
:func:`lorakit.load` reads (an adapter, a mixture, a merged or fully fine-tuned model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.data.source import load_examples
from lorakit.errors import ConfigError
from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.eval.rank_sweep import evaluate_ranks
from lorakit.io.adapters import ADAPTER_KIND
from lorakit.io.directory_kinds import Loaded, get_kind
from lorakit.io.loader import load
from lorakit.io.metadata import read_metadata
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.quant.base_schemes import SCHEMES
from lorakit.quant.quantized_loading import load_base


def load_directory(path: str | Path, base: str | None) -> tuple[Loaded, Any]:
    """The directory at ``path`` through :func:`lorakit.load`, into the model ``base`` names or (None) into
    the base the directory records; with the tokenizer of the model loaded. Either base is quantized as the
    directory records (``lorakit train --quantize``)."""
    if base is None:
        loaded = load(path)
        return loaded, loaded.tokenizer
    metadata = read_metadata(Path(path))
    recorded = metadata.base_quantization if metadata else None
    model, tokenizer = load_base(base, recorded if recorded in SCHEMES else None)
    return load(path, model), tokenizer


def load_kind(path: str | Path, base: str | None, kind: str) -> tuple[Loaded, Any]:
    """:func:`load_directory` of a directory that must be of ``kind``; another kind is refused by name."""
    loaded, tokenizer = load_directory(path, base)
    if loaded.kind != kind:
        raise ConfigError(f"{path} holds {get_kind(loaded.kind).holds} (kind {loaded.kind!r}), not "
                          f"{get_kind(kind).holds}; lorakit eval --adapter takes any kind")
    return loaded, tokenizer


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
    model, tokenizer = model_with_adapter(base, adapter)
    return evaluate_on(model, tokenizer, data, split=split, n=n, batch_size=batch_size, progress=progress)


def evaluate_on(model: nn.Module, tokenizer, data: str, *, split: str = "test", n: int | None = None,
                batch_size: int = 16, progress: bool = False) -> EvalResult:
    """Exact match, loss and perplexity of ``model`` on ``data`` (a JSONL file or ``task:NAME``)."""
    return evaluate(model, tokenizer, load_examples(data, split=split, n=n), batch_size=batch_size,
                    progress=progress)


def evaluate_adapter_ranks(adapter: str | Path, data: str, *, base: str | None = None,
                           ranks: Sequence[int] | None = None, split: str = "test", n: int | None = None,
                           batch_size: int = 16) -> dict[int, EvalResult]:
    """``lorakit dylora eval``: the adapter directory ``adapter`` evaluated on ``data`` at each of ``ranks``
    (default: every rank; :func:`lorakit.eval.rank_sweep.evaluate_ranks`), on ``base`` (None: the recorded one)."""
    loaded, tokenizer = load_kind(adapter, base, ADAPTER_KIND)
    examples = load_examples(data, split=split, n=n)
    return evaluate_ranks(loaded.model, tokenizer, examples, ranks, name=loaded.adapters[0], batch_size=batch_size)
