"""The ``model`` kind: a whole model in the Hugging Face layout (``lorakit merge``, ``lorakit train --full``).

Without ``lorakit.json`` a directory is a model when its ``config.json`` has a ``model_type`` (any Hugging
Face model directory). Loaded alone it is :func:`lorakit.models.load_model`'s model; loaded into a model,
its weights replace that model's, which must have the same parameters and shapes.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lorakit.errors import FormatError
from lorakit.io.directory_kinds import DirectoryKind, Loaded, has_field, register_kind
from lorakit.io.files import load_json, write_atomically
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.models import load_model

MODEL_KIND = "model"
CONFIG_FILE = "config.json"


def write_model_metadata(directory: Path, origin: str) -> None:
    """Mark the model saved in ``directory`` (``save_pretrained``) as kind ``model``, atomically."""
    write_atomically(directory / METADATA_FILE, metadata_writer(MODEL_KIND, origin))


def save_model(model: nn.Module, tokenizer, out_dir: Path, *, origin: str) -> None:
    """Save ``model`` (``save_pretrained``, safetensors) and ``tokenizer`` into ``out_dir`` file by file
    atomically, then ``lorakit.json`` (kind ``model``, ``origin`` what wrote it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".model-", dir=out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, out_dir / item.name)
    write_model_metadata(out_dir, origin=origin)


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    whole, tokenizer = load_model(directory)
    if model is None:
        return Loaded(kind=MODEL_KIND, path=directory, model=whole, base=whole, tokenizer=tokenizer)
    theirs, ours = whole.state_dict(), model.state_dict()
    odd = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k].shape != ours[k].shape)
    if odd:
        raise FormatError(f"{directory}: its {type(whole).__name__} does not fit the model it is loaded into "
                          f"({odd[0]!r} differs: {_shape(theirs, odd[0])} here, {_shape(ours, odd[0])} in the model)")
    with torch.no_grad():
        for key, value in ours.items():
            value.copy_(theirs[key])
    return Loaded(kind=MODEL_KIND, path=directory, model=model, base=model, tokenizer=None)


def _shape(state: dict[str, torch.Tensor], key: str) -> str:
    return str(tuple(state[key].shape)) if key in state else "absent"


def _describe(directory: Path) -> dict[str, Any]:
    config = load_json(directory / CONFIG_FILE)
    parameters = 0
    for weights in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                parameters += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
        except Exception as err:  # the reader raises several types for corrupt input; all mean the same
            raise FormatError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return {"path": str(directory), "model_type": config.get("model_type"),
            "architectures": config.get("architectures"), "parameters": parameters}


MODEL = register_kind(DirectoryKind(
    name=MODEL_KIND, holds="a whole model in the Hugging Face layout", load=_load, describe=_describe,
    recognise=has_field(CONFIG_FILE, "model_type"), recognised_by=f"{CONFIG_FILE} with a model_type", whole_model=True))
