"""``lorakit generate``: completions of prompts by a base model, alone or with any directory lorakit loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.eval.generate import generate
from lorakit.jobs.evaluate import model_with_adapter


def complete(prompts: list[str], *, base: str | None = None, adapter: str | Path | None = None,
             **options: Any) -> list[str]:
    """Generate a completion of each prompt with the base model, or with the directory ``adapter`` (any kind;
    on ``base``, or None: the base it records)."""
    model, tokenizer = model_with_adapter(base, adapter)
    return generate(model, tokenizer, prompts, **options)
