"""``lorakit inspect`` and ``lorakit targets``: what a directory holds; which modules a config wraps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.config import LoraConfig
from lorakit.core.inject import TargetPlan, plan
from lorakit.io.directory_kinds import directory_kind
from lorakit.io.metadata import read_metadata
from lorakit.models import DEFAULT_MODEL, load_model


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """What a directory of any kind holds, from its files alone: its ``kind``, its ``origin`` when
    ``lorakit.json`` records one, and the kind's own description (for an adapter: its config, modules,
    ranks, parameter count and tensor norms)."""
    directory = Path(path)
    kind = directory_kind(directory)
    metadata = read_metadata(directory)
    origin = {"origin": metadata.origin} if metadata is not None and metadata.origin is not None else {}
    return {"kind": kind.name, **origin, **kind.describe(directory)}


def list_targets(lora: LoraConfig, *, base: str = DEFAULT_MODEL) -> list[TargetPlan]:
    """The dry run on a named base model: which modules ``lora`` would wrap, with ranks and scales."""
    model, _ = load_model(base)
    return plan(model, lora)
