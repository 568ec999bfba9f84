"""The base model a directory records, loaded when :func:`lorakit.load` is given no model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import FormatError
from lorakit.io.base_quantization import base_loader
from lorakit.models import load_model


def base_for(model: nn.Module | None, recorded: Any, source: Path,
             quantization: str | None = None) -> tuple[nn.Module, Any | None]:
    """``model`` (and no tokenizer), or, when it is None, the base model ``recorded`` in the file ``source``
    with its tokenizer (:func:`lorakit.models.load_model`, which serves the default model's hub id locally),
    quantized as ``quantization`` says where a loader for that scheme is registered."""
    if model is not None:
        return model, None
    loader = base_loader(quantization) if quantization else None
    return (loader or load_model)(recorded_name(recorded, source))


def recorded_name(recorded: Any, source: Path) -> str:
    """``recorded``, the base model's name or path read from the file ``source``, when it is a non-empty string;
    a :class:`FormatError` saying how to pass the base otherwise."""
    if not isinstance(recorded, str) or not recorded:
        raise FormatError(f"{source}: records no base model (found {recorded!r}); pass the base model to load "
                          "it into (lorakit.load(path, model), or --base on the command line)")
    return recorded
