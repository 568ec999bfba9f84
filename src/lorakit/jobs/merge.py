"""``lorakit merge``: a base model with an adapter folded into its weights, written as a full model."""

from __future__ import annotations

from pathlib import Path

from lorakit.core.merge import merge_and_unload
from lorakit.jobs.evaluate import model_with_adapter
from lorakit.models import DEFAULT_MODEL


def merge_into_model(adapter: str | Path, out: str | Path, *, base: str = DEFAULT_MODEL) -> Path:
    """Write ``base`` with ``adapter`` merged into its weights (safetensors, with the tokenizer) to ``out``."""
    model, tokenizer = model_with_adapter(base, adapter)
    merged = merge_and_unload(model)
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
