"""The ``adapter`` kind: a LoRA adapter in the PEFT format (lorakit's, a LoRA-GA or DyLoRA export, or PEFT's).

An adapter whose ``lorakit.json`` records a ``base_quantization`` loads, with no model given, onto its base
quantized that way (:mod:`lorakit.io.base_quantization`). Without ``lorakit.json`` a directory is an adapter
when its ``adapter_config.json`` has a ``peft_type``
(a foreign PEFT adapter, or one lorakit 0.1 wrote); a type other than ``LORA`` is refused when loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.io.adapters import ADAPTER_KIND, CONFIG_FILE, KEY_PREFIX, load_adapter, read_adapter
from lorakit.io.base_quantization import adapter_quantization, check_quantization
from lorakit.io.directory_kinds import DirectoryKind, Loaded, has_field, register_kind
from lorakit.io.files import load_json
from lorakit.io.metadata import read_metadata
from lorakit.io.recorded_base import base_for

DEFAULT_NAME = "default"


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    recorded = load_json(directory / CONFIG_FILE).get("base_model_name_or_path")
    metadata = read_metadata(directory)
    quantization = metadata.base_quantization if metadata else None
    base, tokenizer = base_for(model, recorded, directory / CONFIG_FILE, quantization)
    name = load_adapter(base, directory, DEFAULT_NAME)
    check_quantization(quantization, adapter_quantization(base, name), directory)
    return Loaded(kind=ADAPTER_KIND, path=directory, model=base, base=base, tokenizer=tokenizer, adapters=(name,))


def describe_adapter(path: str | Path) -> dict[str, Any]:
    """What an adapter directory holds: its config, modules, ranks, parameter count and tensor norms."""
    config, raw, tensors = read_adapter(path)
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in sorted(tensors.items()):
        module, _, part = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
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


ADAPTER = register_kind(DirectoryKind(
    name=ADAPTER_KIND, holds="a LoRA adapter in the PEFT format", load=_load, describe=describe_adapter,
    recognise=has_field(CONFIG_FILE, "peft_type"), recognised_by=f"{CONFIG_FILE} with a peft_type"))
