"""Writing a finished run's result: the adapter in PEFT format, or the full model (also what ``merge`` writes)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from lorakit.io.adapters import save_adapter
from lorakit.io.model_kind import write_model_metadata


def save_result(model: nn.Module, tokenizer, out_dir: Path, *, full: bool) -> None:
    """Save the trained adapter (or, with ``full``, model and tokenizer: :func:`save_model`) into ``out_dir``,
    file by file atomically, replacing the files of an earlier result only once each new file is complete."""
    if full:
        save_model(model, tokenizer, out_dir, origin="full fine-tune")
    else:
        save_adapter(model, out_dir)


def save_model(model: nn.Module, tokenizer, out_dir: Path, *, origin: str) -> None:
    """Save ``model`` (``save_pretrained``, safetensors) and ``tokenizer`` into ``out_dir`` file by file
    atomically, then ``lorakit.json`` (kind ``model``, ``origin`` what wrote it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".model-", dir=out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, out_dir / item.name)
    write_model_metadata(out_dir, origin=origin)
