"""``lorakit generate``: completions of prompts by a base model, alone or with an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.eval.generate import generate
from lorakit.jobs.evaluate import model_with_adapter
from lorakit.models import DEFAULT_MODEL


def complete(prompts: list[str], *, base: str = DEFAULT_MODEL, adapter: str | Path | None = None,
             **options: Any) -> list[str]:
    """Generate a completion of each prompt with the base model, or with ``adapter``."""
    model, tokenizer = model_with_adapter(base, adapter)
    return generate(model, tokenizer, prompts, **options)
