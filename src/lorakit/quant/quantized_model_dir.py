"""A whole model whose linears are stored quantized, as a directory :func:`lorakit.load` reads.

One layout serves every quantized layer type (each a :class:`QuantizedLayers`: L4Q's integer grid, lorakit's
NormalFloat codes)::

    config.json (+ generation_config.json)  model.config.save_pretrained
    tokenizer files                          when a tokenizer is given
    model.safetensors                        every other tensor of the state dict (tied weights once)
    quantized_linears.safetensors            the quantized layers, in their type's own file format
    lorakit.json                             {"format": 1, "kind": KIND, "origin": ...}

A new directory is built in a hidden sibling and renamed into place; into an existing one (a training run's
directory) the files are built in a hidden subdirectory and moved in, ``lorakit.json`` last, so the directory
reads as a quantized model only once every file is complete. Loading builds the architecture from ``config.json``
(``AutoModelForCausalLM.from_config``), puts the quantized linears in place (checked against the model's shapes
first) and loads the rest: the logits are those of the model that was saved, bit for bit.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, FormatError, StateError
from lorakit.io.directory_kinds import DirectoryKind, Loaded, register_kind
from lorakit.io.files import load_json, load_tensors, tensor_writer
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.models.atomic import build_atomically
from lorakit.quant.model_quantization import replace_module

MODEL_FILE = "model.safetensors"
QUANTIZED_FILE = "quantized_linears.safetensors"


@dataclass(frozen=True)
class StoredLayer:
    """One layer read from ``quantized_linears.safetensors``: its (out, in) shape, the name of its first tensor
    (for messages), its quantization settings (for ``describe``) and how to build the module from the linear the
    architecture has in its place."""

    shape: tuple[int, int]
    tensor: str
    settings: Mapping[str, Any]
    build: Callable[[nn.Module], nn.Module]


@dataclass(frozen=True, kw_only=True)
class QuantizedLayers:
    """How the layers of one quantized type are stored: the directory kind holding them, the writer and reader of
    their file, and which of a layer's state-dict entries that file holds (None: all; the rest, a bias for
    instance, go to ``model.safetensors`` with the other tensors)."""

    kind: str
    holds: str
    layer_type: type[nn.Module]
    write: Callable[[Mapping[str, nn.Module]], Callable[[Path], None]]
    read: Callable[[Path], Mapping[str, StoredLayer]]
    stored: frozenset[str] | None = None

    def holds_entry(self, key: str, layers: set[str]) -> bool:
        """Whether the state-dict entry ``key`` belongs in the quantized file (a stored part of one of ``layers``)."""
        module, _, part = key.rpartition(".")
        return module in layers and (self.stored is None or part in self.stored)


def _other_tensors(model: nn.Module, layers: QuantizedLayers, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The state dict without what the quantized file holds, each storage once (the first name of tied weights)."""
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if layers.holds_entry(key, quantized):
            continue
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if where not in seen:
            seen.add(where)
            tensors[key] = value
    return tensors


def save_quantized_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, layers: QuantizedLayers,
                         origin: str) -> Path:
    """Write ``model``, whose quantized linears are ``layers.layer_type`` (and ``tokenizer``, unless None), to
    ``out_dir`` as a ``layers.kind`` directory; see the module docstring."""
    directory = Path(out_dir)
    found = {name: m for name, m in model.named_modules() if isinstance(m, layers.layer_type)}
    if not found:
        raise StateError(f"{type(model).__name__} holds no {layers.layer_type.__name__} layers; nothing to save as "
                         f"a {layers.kind} directory")
    if getattr(model, "lorakit_state", None) is not None:
        raise StateError(f"the model still holds LoRA adapters; a {layers.kind} directory holds no side adapters")

    def build(target: Path) -> None:
        model.config.save_pretrained(target)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        tensor_writer(_other_tensors(model, layers, set(found)))(target / MODEL_FILE)
        layers.write(found)(target / QUANTIZED_FILE)
        metadata_writer(layers.kind, origin=origin)(target / METADATA_FILE)

    if not directory.exists():
        return build_atomically(directory, build)
    with tempfile.TemporaryDirectory(prefix=f".{layers.kind}-", dir=directory) as tmp:
        built = Path(tmp)
        build(built)
        items = sorted(built.iterdir(), key=lambda p: p.name == METADATA_FILE)  # lorakit.json last
        for item in items:
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        for item in items:
            os.replace(item, directory / item.name)
    return directory


def _architecture(directory: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise FormatError(f"{directory / 'config.json'}: not a model config transformers reads ({err})") from None
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _put_linears(model: nn.Module, stored: Mapping[str, StoredLayer], layer_type: type[nn.Module], path: Path) -> None:
    """Replace each linear named in ``stored`` (every one checked against the model's shapes first)."""
    modules = dict(model.named_modules())
    for name, layer in stored.items():
        found = modules.get(name)
        if not isinstance(found, nn.Linear | layer_type):
            raise FormatError(f"{path}: layer {name!r} is not a linear layer of the model "
                              f"({type(found).__name__ if found is not None else 'no such module'})")
        shape = (found.out_features, found.in_features)
        if shape != layer.shape:
            raise FormatError(f"{path}: tensor {layer.tensor!r} has shape {list(layer.shape)}, but the model's linear "
                              f"there is {list(shape)}")
    for name, layer in stored.items():
        found = modules[name]
        replace_module(model, name, layer.build(found).to(_device(found)))


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], layers: QuantizedLayers, path: Path) -> None:
    """Copy ``tensors`` into the model: every key must be the model's, of its shape; every tensor the model has
    beyond what the quantized file holds must be given, or tied to a given one."""
    ours = model.state_dict()
    for key, value in tensors.items():
        if key not in ours:
            raise FormatError(f"{path}: tensor {key!r} is no tensor of the model")
        if ours[key].shape != value.shape:
            raise FormatError(f"{path}: tensor {key!r} has shape {list(value.shape)}, the model's is "
                              f"{list(ours[key].shape)}")
    given = {ours[key].untyped_storage().data_ptr() for key in tensors}
    quantized = {n for n, m in model.named_modules() if isinstance(m, layers.layer_type)}
    missing = [key for key, value in ours.items() if key not in tensors and not layers.holds_entry(key, quantized)
               and value.untyped_storage().data_ptr() not in given]
    if missing:
        raise FormatError(f"{path}: tensor {missing[0]!r} of the model is missing")
    with torch.no_grad():
        for key, value in tensors.items():
            ours[key].copy_(value)


def _loader(layers: QuantizedLayers) -> Callable[[Path, nn.Module | None], Loaded]:
    def load(directory: Path, model: nn.Module | None) -> Loaded:
        stored = layers.read(directory / QUANTIZED_FILE)  # every check before anything changes
        tensors = load_tensors(directory / MODEL_FILE)
        tokenizer = None
        if model is None:
            dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
            model = _architecture(directory, dtypes[0] if dtypes else torch.float32)
            if (directory / "tokenizer_config.json").is_file():
                from lorakit.models.load import finish_loading, load_tokenizer
                model, tokenizer = finish_loading(model, load_tokenizer(str(directory), directory), str(directory))
        elif getattr(model, "lorakit_state", None) is not None:
            raise ConfigError(f"the model holds lorakit adapters; load a {layers.kind} directory into a bare model")
        _put_linears(model, stored, layers.layer_type, directory / QUANTIZED_FILE)
        _load_rest(model, tensors, layers, directory / MODEL_FILE)
        model.eval()
        return Loaded(kind=layers.kind, path=directory, model=model, base=model, tokenizer=tokenizer)
    return load


def register_quantized_model_kind(layers: QuantizedLayers) -> DirectoryKind:
    """Register the directory kind ``layers.kind`` (a whole model), loaded and described as this module says."""
    def describe(directory: Path) -> dict[str, Any]:
        config = load_json(directory / "config.json")
        stored = layers.read(directory / QUANTIZED_FILE)
        settings = sorted({json.dumps(dict(s.settings), sort_keys=True) for s in stored.values()})
        return {"path": str(directory), "model_type": config.get("model_type"), "quantized_linears": len(stored),
                "quantized_parameters": sum(s.shape[0] * s.shape[1] for s in stored.values()),
                "quantizations": [json.loads(text) for text in settings]}

    return register_kind(DirectoryKind(name=layers.kind, holds=layers.holds, load=_loader(layers),
                                       describe=describe, whole_model=True))
