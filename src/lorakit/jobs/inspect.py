"""``lorakit inspect`` and ``lorakit targets``: what an adapter directory holds; which modules a config wraps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.config import LoraConfig
from lorakit.core.inject import TargetPlan, plan
from lorakit.io.adapters import read_adapter
from lorakit.models import DEFAULT_MODEL, load_model


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """What an adapter directory holds: its config, modules, ranks, parameter count and tensor norms."""
    config, raw, tensors = read_adapter(path)
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in sorted(tensors.items()):
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        entry = modules.setdefault(module, {})
        side = "A" if part.startswith(("A", "embedding_A")) else "B"
        entry[f"{side}_shape"] = list(tensor.shape)
        entry[f"{side}_norm"] = float(tensor.float().norm())
    for module, entry in modules.items():
        entry["rank"] = entry["A_shape"][0]
        entry["scale"] = config.scale_for(module)
    return {"path": str(path), "base_model": raw.get("base_model_name_or_path"), "rank": config.rank,
            "alpha": config.alpha, "use_rslora": config.use_rslora, "target_modules": raw.get("target_modules"),
            "parameters": sum(t.numel() for t in tensors.values()), "modules": modules}


def list_targets(lora: LoraConfig, *, base: str = DEFAULT_MODEL) -> list[TargetPlan]:
    """The dry run on a named base model: which modules ``lora`` would wrap, with ranks and scales."""
    model, _ = load_model(base)
    return plan(model, lora)
