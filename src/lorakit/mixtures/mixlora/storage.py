"""Saving and loading a MixLoRA model: its adapters in PEFT format, its routers, its config.

A directory holds ``mixlora_config.json`` (the config, the expert names in router order, the FFN
paths, the base model, and the name of the folder with the weights) and that folder,
``mixlora-<8 hex digits>/``: ``attention/`` and ``expert0/`` .. ``expert{E-1}/`` (each a PEFT-format
adapter, so an expert alone loads in PEFT as a plain LoRA of the FFN) and ``routers.safetensors``
(one ``(E, H)`` fp32 tensor per block, keyed ``<ffn path>.router.weight``). A save writes a new folder,
then replaces the config atomically (the commit), then removes older folders: a save that stops
half-way leaves the previous save loading as it was. Loading checks the config, the FFNs and every
router against the base before it changes the model, and removes what it attached if an adapter
fails to load. ``lorakit.json`` (kind ``mixlora``) is committed with the config; a directory lorakit 0.1
wrote (without it) is recognised by its ``mixlora_config.json``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from lorakit.core.lifecycle import delete_adapter
from lorakit.errors import ConfigError, FormatError, StateError
from lorakit.io.adapters import base_model_name, load_adapter, save_adapter
from lorakit.io.directory_kinds import DirectoryKind, Loaded, has_field, register_kind
from lorakit.io.files import json_writer, load_json, load_tensors, tensor_writer, write_all_atomically
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.io.recorded_base import base_for
from lorakit.mixtures.mixlora.attach import ATTENTION, expert_names, mixlora_layers, new_router, wrap_ffns
from lorakit.mixtures.mixlora.config import MixLoraConfig
from lorakit.mixtures.mixlora.ffn import MixLoraFFN
from lorakit.mixtures.mixlora.router import Router
from lorakit.mixtures.mixlora.structure import find_ffns

MIXLORA_KIND = "mixlora"
CONFIG_FILE = "mixlora_config.json"
ROUTERS_FILE = "routers.safetensors"
_FOLDER = re.compile(r"mixlora-[0-9a-f]{8}")


def router_key(ffn_path: str) -> str:
    """The key of the router of the FFN at ``ffn_path`` in ``routers.safetensors``."""
    return f"{ffn_path}.router.weight"


def saved_folder(directory: str | Path) -> Path:
    """The folder holding the weights of the save committed in ``directory`` (see the module docstring)."""
    source = Path(directory) / CONFIG_FILE
    folder = load_json(source).get("folder")
    if not isinstance(folder, str) or not _FOLDER.fullmatch(folder):
        raise FormatError(f"{source}: 'folder' must name the weights' folder (mixlora-<8 hex digits>), "
                          f"found {folder!r}")
    return Path(directory) / folder


def save_mixlora(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s MixLoRA adapters, routers and config to directory ``path``; returns the directory."""
    layers = mixlora_layers(model)
    first = layers[0][1]
    config = first.config
    directory = Path(path)
    folder = f"mixlora-{uuid.uuid4().hex[:8]}"
    if config.attention_targets:
        save_adapter(model, directory / folder / ATTENTION, ATTENTION)
    for name in first.experts:
        save_adapter(model, directory / folder / name, name)
    routers = {router_key(name): layer.router.weight.float() for name, layer in layers}
    saved = {"mixlora": dataclasses.asdict(config), "experts": list(first.experts), "folder": folder,
             "layers": [name for name, _ in layers], "base_model_name_or_path": base_model_name(model)}
    write_all_atomically({directory / folder / ROUTERS_FILE: tensor_writer(routers),
                          directory / CONFIG_FILE: json_writer(saved),
                          directory / METADATA_FILE: metadata_writer(MIXLORA_KIND)})
    for stale in directory.iterdir():  # folders of earlier or interrupted saves
        if stale.is_dir() and _FOLDER.fullmatch(stale.name) and stale.name != folder:
            shutil.rmtree(stale)
    return directory


def read_config(directory: Path) -> tuple[MixLoraConfig, list[str]]:
    """The saved config and FFN paths; a :class:`FormatError` names the file and what is wrong."""
    source = directory / CONFIG_FILE
    saved = load_json(source)
    fields = saved.get("mixlora")
    if not isinstance(fields, dict):
        raise FormatError(f"{source}: 'mixlora' must be an object of MixLoraConfig fields")
    if isinstance(fields.get("attention_targets"), list):
        fields = {**fields, "attention_targets": tuple(fields["attention_targets"])}
    try:
        config = MixLoraConfig(**fields)
    except (TypeError, ConfigError) as err:
        raise FormatError(f"{source}: invalid MixLoRA config ({err})") from None
    if saved.get("experts") != expert_names(config):
        raise FormatError(f"{source}: 'experts' must list {expert_names(config)} in order, "
                          f"found {saved.get('experts')!r}")
    layers = saved.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise FormatError(f"{source}: 'layers' must be a non-empty list of FFN module paths")
    return config, layers


def read_routers(model: nn.Module, directory: Path, config: MixLoraConfig, layers: list[str]) -> dict[str, Router]:
    """The saved routers, checked against the FFNs of ``model`` (paths, shapes, finiteness)."""
    source = saved_folder(directory) / ROUTERS_FILE
    found = find_ffns(model)
    if found != layers:
        raise FormatError(f"{directory / CONFIG_FILE}: saved for FFNs {layers[:2]}... ({len(layers)}), but this "
                          f"model has {found[:2]}... ({len(found)})")
    tensors = load_tensors(source)
    if set(tensors) != {router_key(p) for p in layers}:
        raise FormatError(f"{source}: holds {sorted(tensors)[:3]}..., expected one '<ffn>.router.weight' per FFN "
                          f"({router_key(layers[0])}, ...)")
    routers = {}
    for path in layers:
        router = new_router(model.get_submodule(path), config)
        tensor = tensors[router_key(path)]
        if tensor.shape != router.weight.shape or not torch.isfinite(tensor).all():
            raise FormatError(f"{source}: {router_key(path)} has shape {tuple(tensor.shape)} (or non-finite "
                              f"values); this model needs a finite {tuple(router.weight.shape)}")
        with torch.no_grad():
            router.weight.copy_(tensor)
        routers[path] = router
    return routers


def saved_adapter_names(config: MixLoraConfig) -> tuple[str, ...]:
    """The adapters a MixLoRA save holds, in load order: the attention adapter (if any), then the experts."""
    return tuple(([ATTENTION] if config.attention_targets else []) + expert_names(config))


def load_mixlora(model: nn.Module, path: str | Path, *, trainable: bool = False) -> list[MixLoraFFN]:
    """Make ``model`` (the base the MixLoRA model was trained on) the saved MixLoRA model; returns its FFNs.

    Frozen unless ``trainable`` (then the adapters and routers train, to continue training)."""
    if any(isinstance(m, MixLoraFFN) for m in model.modules()):
        raise StateError("the model already has MixLoRA layers")
    directory = Path(path)
    config, layers = read_config(directory)
    routers = read_routers(model, directory, config, layers)
    names = saved_adapter_names(config)
    loaded = []
    try:
        for name in names:
            loaded.append(load_adapter(model, saved_folder(directory) / name, name, activate=name == ATTENTION,
                                       trainable=trainable))
    except Exception:
        for name in reversed(loaded):
            delete_adapter(model, name)
        raise
    for router in routers.values():
        router.requires_grad_(trainable)
    return wrap_ffns(model, layers, config, routers)


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    base, tokenizer = base_for(model, load_json(directory / CONFIG_FILE).get("base_model_name_or_path"),
                               directory / CONFIG_FILE)
    load_mixlora(base, directory)
    names = saved_adapter_names(read_config(directory)[0])
    return Loaded(kind=MIXLORA_KIND, path=directory, model=base, base=base, tokenizer=tokenizer, adapters=names)


def _describe(directory: Path) -> dict:
    config, layers = read_config(directory)
    return {"path": str(directory), "base_model": load_json(directory / CONFIG_FILE).get("base_model_name_or_path"),
            "mixlora": dataclasses.asdict(config), "experts": expert_names(config), "feed_forward_blocks": layers}


register_kind(DirectoryKind(
    name=MIXLORA_KIND, holds="a MixLoRA model (LoRA experts routed inside each feed-forward block)", load=_load,
    describe=_describe, recognise=has_field(CONFIG_FILE, "mixlora"), recognised_by=f"{CONFIG_FILE} (lorakit 0.1)",
    routed="its experts are routed per token inside each feed-forward block"))
