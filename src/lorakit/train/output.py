"""Writing a finished run's result: the adapter in PEFT format, or the full model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from lorakit.io.adapters import save_adapter


def save_result(model: nn.Module, tokenizer, out_dir: Path, *, full: bool) -> None:
    """Save the trained adapter (or, with ``full``, model and tokenizer) into ``out_dir``, file by file
    atomically, replacing the files of an earlier result only once each new file is complete."""
    if not full:
        save_adapter(model, out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".model-", dir=out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, out_dir / item.name)
