"""``lorakit eval``: exact match, loss and perplexity of a base model, alone or with an adapter."""

from __future__ import annotations

from pathlib import Path

from lorakit.data.source import load_examples
from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.io.adapters import load_adapter
from lorakit.models import DEFAULT_MODEL, load_model


def model_with_adapter(base: str, adapter: str | Path | None):
    """The base model with ``adapter``: a PEFT-format adapter, or a MixLoRA directory."""
    model, tokenizer = load_model(base)
    if adapter is not None and (Path(adapter) / "mixlora_config.json").is_file():
        from lorakit.mixtures.mixlora import load_mixlora
        load_mixlora(model, adapter)
    elif adapter is not None:
        load_adapter(model, adapter)
    return model, tokenizer


def evaluate_adapter(data: str, *, base: str = DEFAULT_MODEL, adapter: str | Path | None = None,
                     split: str = "test", n: int | None = None, batch_size: int = 16,
                     progress: bool = False) -> EvalResult:
    """Exact match, loss and perplexity of the base model, or of it with ``adapter``, on ``data``."""
    examples = load_examples(data, split=split, n=n)
    model, tokenizer = model_with_adapter(base, adapter)
    return evaluate(model, tokenizer, examples, batch_size=batch_size, progress=progress)
