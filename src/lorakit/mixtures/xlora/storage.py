"""Saving and loading an X-LoRA model: the classifier, its config, and references to the experts.

A directory holds ``xlora_config.json`` (the X-LoRA config, the expert names and where each expert
lives, the adapted modules in slot order, the base model) and ``xlora_classifier.safetensors``.
Experts are referenced by path (relative to the directory when they sit inside or beside it, so a moved
or copied run still loads; absolute otherwise), or copied into ``experts/<name>/`` (PEFT format) with
``bundle=True`` so the directory is self-contained; trainable experts are always copied, since
training changed them. Loading checks that the experts fit the base and that the classifier fits.
``lorakit.json`` names the kind ``xlora``; a directory lorakit 0.1 wrote (without it, experts by absolute
path) is recognised by its ``xlora_config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import FormatError
from lorakit.io.adapters import base_model_name, load_adapter, save_adapter
from lorakit.io.directory_kinds import DirectoryKind, Loaded, has_field, register_kind
from lorakit.io.files import json_writer, load_json, load_tensors, tensor_writer, write_all_atomically
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.io.paths import portable_path, recorded_directory
from lorakit.io.recorded_base import base_for
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.model import XLoraModel

XLORA_KIND = "xlora"
CONFIG_FILE = "xlora_config.json"
CLASSIFIER_FILE = "xlora_classifier.safetensors"
EXPERTS_DIR = "experts"


def save_xlora(model: XLoraModel, path: str | Path, expert_paths: Mapping[str, str | Path], *,
               bundle: bool = False) -> Path:
    """Write ``model``'s classifier and config to ``path``; experts by reference or (``bundle``) copied in."""
    directory = Path(path)
    copy = bundle or model.config.trainable_experts
    experts = []  # a list, not an object: the order is the scalings' expert axis
    for name in model.experts:
        if copy:
            save_adapter(model.base, directory / EXPERTS_DIR / name, name)
            experts.append({"name": name, "path": f"{EXPERTS_DIR}/{name}"})
        else:
            experts.append({"name": name, "path": portable_path(expert_paths[name], directory)})
    config = {"xlora": dataclasses.asdict(model.config), "experts": experts, "layer_names": model.layer_names,
              "hidden_size": model.base.config.hidden_size, "base_model_name_or_path": base_model_name(model.base)}
    write_all_atomically({directory / CLASSIFIER_FILE: tensor_writer(model.classifier.state_dict()),
                          directory / CONFIG_FILE: json_writer(config),
                          directory / METADATA_FILE: metadata_writer(XLORA_KIND)})
    return directory


def expert_paths(path: str | Path) -> dict[str, Path]:
    """Where the experts of the saved X-LoRA model at ``path`` live (relative paths resolved against it); a
    missing expert is a :class:`FormatError` naming it and where it was looked for."""
    directory = Path(path)
    source = directory / CONFIG_FILE
    experts = load_json(source).get("experts")
    if (not isinstance(experts, list) or not experts
            or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("path"), str)
                       for e in experts)):
        raise FormatError(f"{source}: 'experts' must be a non-empty list of {{name, path}}")
    return {e["name"]: recorded_directory(e["path"], directory, what=f"expert {e['name']!r}", source=source)
            for e in experts}


def load_xlora(base: nn.Module, path: str | Path) -> XLoraModel:
    """Load the X-LoRA model saved at ``path`` onto ``base`` (its experts are loaded as adapters)."""
    directory = Path(path)
    saved = load_json(directory / CONFIG_FILE)
    try:
        config = XLoraConfig(**saved["xlora"])
    except (KeyError, TypeError) as err:
        raise FormatError(f"{directory / CONFIG_FILE}: invalid X-LoRA config ({err})") from None
    experts = expert_paths(directory)
    for name, expert in experts.items():
        load_adapter(base, expert, name, activate=False, trainable=config.trainable_experts)
    model = XLoraModel(base, list(experts), config)
    if model.layer_names != saved.get("layer_names"):
        raise FormatError(f"{directory / CONFIG_FILE}: the experts adapt other modules of this base than the "
                          f"saved model did ({len(model.layer_names)} vs {len(saved.get('layer_names') or [])})")
    tensors = load_tensors(directory / CLASSIFIER_FILE)
    own = model.classifier.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise FormatError(f"{directory / CLASSIFIER_FILE}: the classifier does not fit this base and these experts")
    with torch.no_grad():
        model.classifier.load_state_dict(tensors)
    return model


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    base, tokenizer = base_for(model, load_json(directory / CONFIG_FILE).get("base_model_name_or_path"),
                               directory / CONFIG_FILE)
    xmodel = load_xlora(base, directory).eval()
    return Loaded(kind=XLORA_KIND, path=directory, model=xmodel, base=base, tokenizer=tokenizer,
                  adapters=xmodel.experts)


def _describe(directory: Path) -> dict:
    saved = load_json(directory / CONFIG_FILE)
    return {"path": str(directory), "base_model": saved.get("base_model_name_or_path"), "xlora": saved.get("xlora"),
            "experts": {e.get("name"): e.get("path") for e in saved.get("experts") or [] if isinstance(e, dict)},
            "modules": len(saved.get("layer_names") or [])}


register_kind(DirectoryKind(
    name=XLORA_KIND, holds="an X-LoRA model (a classifier over LoRA experts)", load=_load, describe=_describe,
    recognise=has_field(CONFIG_FILE, "xlora"), recognised_by=f"{CONFIG_FILE} (lorakit 0.1)",
    routed="its experts are mixed per token by a classifier"))
