"""The quantization of the base an adapter was trained on: found on the model, recorded in ``lorakit.json``
(``base_quantization``), and rebuilt or checked when the adapter is loaded.

QLoRA's adapter (Dettmers et al. 2023) learns against the *quantized* weights ``Q(W)``; on the full-precision
``W`` it still works, but its outputs are not the ones it was trained and evaluated with. So an adapter saved
from a model whose adapted layers are all quantized the same way records that scheme (``"nf4"``, ``"int8"``,
bitsandbytes' ``"bnb-nf4"``, ...); loading it with no model rebuilds the base that way when a loader for the
scheme is registered (:mod:`lorakit.quant` registers ``nf4`` and ``int8``), and loading it into a model quantized
otherwise (or not at all) warns, naming both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.core.kinds import QuantizedLinearKind
from lorakit.core.state import model_state

BaseLoader = Callable[[str], tuple[nn.Module, Any]]
"""Loads the base model a name or path gives, quantized under one scheme: ``(model, tokenizer)``."""

_LOADERS: dict[str, BaseLoader] = {}


def register_base_loader(scheme: str, loader: BaseLoader) -> None:
    """Let adapters that record ``scheme`` rebuild their base with ``loader`` (a package above io calls this)."""
    _LOADERS[scheme] = loader


def base_loader(scheme: str) -> BaseLoader | None:
    """The loader registered for ``scheme``, or None."""
    return _LOADERS.get(scheme)


def layer_quantization(layer: nn.Module) -> str | None:
    """The scheme of a wrapped layer's base (:meth:`QuantizedLinearKind.scheme`), None when it is not quantized."""
    return layer.kind.scheme(layer.base_layer) if isinstance(layer.kind, QuantizedLinearKind) else None


def model_quantization(model: nn.Module, modules: list[str]) -> str | None:
    """The one scheme every module of ``modules`` (wrapped layers of ``model``) is quantized with; None when they are
    all full precision; ``"mixed"`` when they differ (LQ-LoRA's per-matrix configurations)."""
    schemes = {layer_quantization(model.get_submodule(name)) for name in modules}
    if len(schemes) > 1:
        return "mixed"
    return next(iter(schemes), None)


def adapter_quantization(model: nn.Module, name: str) -> str | None:
    """:func:`model_quantization` over the modules of adapter ``name``."""
    return model_quantization(model, list(model_state(model).require(name).modules))


def _described(scheme: str | None) -> str:
    return "full-precision" if scheme is None else f"{scheme}-quantized"


def check_quantization(recorded: str | None, found: str | None, source: Path) -> None:
    """Warn when an adapter trained on a base quantized as ``recorded`` is loaded onto one quantized as ``found``
    (None: full precision)."""
    if recorded == found:
        return
    hint = f"; load it with no model to get the {recorded} base it was trained on" if base_loader(recorded) else ""
    warnings.warn(f"{source}: this adapter was trained on a {_described(recorded)} base and is loaded onto a "
                  f"{_described(found)} one: it runs, but its outputs differ from those it was trained and "
                  f"evaluated with{hint}", stacklevel=3)
