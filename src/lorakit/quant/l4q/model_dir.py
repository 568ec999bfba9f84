"""The ``l4q-model`` directory kind: a whole model whose adapted linears L4Q quantized, for :func:`lorakit.load`.

:func:`save_l4q_model` writes, for a model :func:`~lorakit.quant.l4q.l4q_model.finalize_l4q` finalized::

    config.json (+ generation_config.json)  model.config.save_pretrained
    tokenizer files                          when a tokenizer is given
    model.safetensors                        every other tensor of the state dict (tied weights once)
    quantized_linears.safetensors            the UniformQuantizedLinear layers (:mod:`lorakit.quant.l4q.l4q_files`)
    lorakit.json                             {"format": 1, "kind": "l4q-model"}

A new directory is built in a hidden sibling and renamed into place; into an existing one (a training run's
directory) the files are built in a hidden subdirectory and moved in, ``lorakit.json`` last, so the directory
reads as an L4Q model only once every file is complete. Loading builds the architecture from ``config.json``
(``AutoModelForCausalLM.from_config``), puts the quantized linears in place and loads the rest: the logits are
those of the finalized model that was saved, bit for bit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, FormatError, StateError
from lorakit.io.directory_kinds import DirectoryKind, Loaded, register_kind
from lorakit.io.files import load_json, load_tensors, tensor_writer
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.models.atomic import build_atomically
from lorakit.quant.l4q.l4q_files import load_quantized_linears, quantized_linears_writer
from lorakit.quant.l4q.l4q_linear import L4QLinear
from lorakit.quant.l4q.uniform_linear import UniformQuantizedLinear

L4Q_MODEL_KIND = "l4q-model"
MODEL_FILE = "model.safetensors"
QUANTIZED_FILE = "quantized_linears.safetensors"


def _unquantized_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The state dict without the quantized layers' tensors, each storage once (the first name of tied weights)."""
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if where not in seen:
            seen.add(where)
            tensors[key] = value
    return tensors


def save_l4q_model(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the finalized L4Q ``model`` (and ``tokenizer``, unless None) to ``out_dir``; see the module docstring."""
    directory = Path(out_dir)
    if any(isinstance(m, L4QLinear) for m in model.modules()):
        raise StateError("the model still holds L4QLinear layers; call finalize_l4q(model) before saving it")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, UniformQuantizedLinear)}
    if not layers:
        raise StateError(f"{type(model).__name__} holds no L4Q quantized linears; nothing to save as an l4q-model")
    if getattr(model, "lorakit_state", None) is not None:
        raise StateError("the model still holds LoRA adapters; an l4q-model directory holds no side adapters")

    def build(target: Path) -> None:
        model.config.save_pretrained(target)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        tensor_writer(_unquantized_tensors(model, set(layers)))(target / MODEL_FILE)
        quantized_linears_writer(layers)(target / QUANTIZED_FILE)
        metadata_writer(L4Q_MODEL_KIND, origin="l4q")(target / METADATA_FILE)

    if not directory.exists():
        return build_atomically(directory, build)
    with tempfile.TemporaryDirectory(prefix=".l4q-model-", dir=directory) as tmp:
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


def _put_linears(model: nn.Module, layers: dict[str, UniformQuantizedLinear], path: Path) -> None:
    """Replace each linear named in ``layers`` (checked against the model's shapes first)."""
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        found = modules.get(name)
        if not isinstance(found, nn.Linear | UniformQuantizedLinear):
            raise FormatError(f"{path}: layer {name!r} is not a linear layer of the model "
                              f"({type(found).__name__ if found is not None else 'no such module'})")
        shape = (found.out_features, found.in_features)
        if shape != (layer.out_features, layer.in_features):
            stored = [layer.out_features, layer.in_features]
            raise FormatError(f"{path}: tensor {name + '.codes'!r} has shape {stored}, but the model's linear "
                              f"there is {list(shape)}")
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        found = modules[name]
        device = found.weight.device if isinstance(found, nn.Linear) else found.codes.device
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(device))


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``tensors`` into the model: every key must be the model's, of its shape; every tensor the model has
    beyond the quantized layers must be given, or tied to a given one."""
    ours = model.state_dict()
    for key, value in tensors.items():
        if key not in ours:
            raise FormatError(f"{path}: tensor {key!r} is no tensor of the model")
        if ours[key].shape != value.shape:
            raise FormatError(f"{path}: tensor {key!r} has shape {list(value.shape)}, the model's is "
                              f"{list(ours[key].shape)}")
    given = {ours[key].untyped_storage().data_ptr() for key in tensors}
    quantized = {n for n, m in model.named_modules() if isinstance(m, UniformQuantizedLinear)}
    missing = [key for key, value in ours.items() if key not in tensors and key.rpartition(".")[0] not in quantized
               and value.untyped_storage().data_ptr() not in given]
    if missing:
        raise FormatError(f"{path}: tensor {missing[0]!r} of the model is missing")
    with torch.no_grad():
        for key, value in tensors.items():
            ours[key].copy_(value)


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    layers = load_quantized_linears(directory / QUANTIZED_FILE)  # every check before anything changes
    tensors = load_tensors(directory / MODEL_FILE)
    tokenizer = None
    if model is None:
        dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
        model = _architecture(directory, dtypes[0] if dtypes else torch.float32)
        if (directory / "tokenizer_config.json").is_file():
            from lorakit.models.load import finish_loading, load_tokenizer
            model, tokenizer = finish_loading(model, load_tokenizer(str(directory), directory), str(directory))
    elif getattr(model, "lorakit_state", None) is not None:
        raise ConfigError("the model holds lorakit adapters; load an l4q-model directory into a bare model")
    _put_linears(model, layers, directory / QUANTIZED_FILE)
    _load_rest(model, tensors, directory / MODEL_FILE)
    model.eval()
    return Loaded(kind=L4Q_MODEL_KIND, path=directory, model=model, base=model, tokenizer=tokenizer)


def _describe(directory: Path) -> dict[str, Any]:
    config = load_json(directory / "config.json")
    layers = load_quantized_linears(directory / QUANTIZED_FILE)
    configs = sorted({(layer.config.bits, layer.config.group_size) for layer in layers.values()})
    return {"path": str(directory), "model_type": config.get("model_type"), "quantized_linears": len(layers),
            "quantized_parameters": sum(layer.codes.numel() for layer in layers.values()),
            "bits_and_group_sizes": [list(c) for c in configs]}


L4Q_MODEL = register_kind(DirectoryKind(
    name=L4Q_MODEL_KIND, holds="a whole model whose linears L4Q quantized (integer codes with per-group steps)",
    load=_load, describe=_describe, whole_model=True))
