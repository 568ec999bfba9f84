"""Writing a finished run's result: the adapter in PEFT format, or the full model
(:func:`lorakit.io.model_kind.save_model`, also what ``merge`` writes)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.io.adapters import save_adapter
from lorakit.io.model_kind import save_model


def save_result(model: nn.Module, tokenizer, out_dir: Path, *, full: bool) -> None:
    """Save the trained adapter (or, with ``full``, model and tokenizer: :func:`save_model`) into ``out_dir``,
    file by file atomically, replacing the files of an earlier result only once each new file is complete."""
    if full:
        save_model(model, tokenizer, out_dir, origin="full fine-tune")
    else:
        save_adapter(model, out_dir)
