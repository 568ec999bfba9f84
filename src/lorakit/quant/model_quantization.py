"""Quantizing a model's linear layers in place: each ``nn.Linear`` becomes an :class:`NFLinear`.

Layers are converted one at a time, so memory peaks at one layer's full-precision copy beyond the
model. By default every ``nn.Linear`` is converted except the output head (``get_output_embeddings()``),
as QLoRA (Dettmers et al. 2023) does; embeddings are never linear layers, so they stay as they are.
Quantize before attaching adapters: layers already wrapped by lorakit are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lorakit.core.inject import candidate_modules
from lorakit.errors import TargetError
from lorakit.quant.nf_config import NFConfig
from lorakit.quant.nf_linear import NFLinear


@dataclass(frozen=True)
class QuantizationSummary:
    """What :func:`quantize_model` converted, and the bytes of those weights before and after."""

    modules: tuple[str, ...]
    bytes_before: int
    """The converted layers' weights as they were (biases stay and are not counted)."""
    bytes_after: int
    """What their :class:`NFTensor` parts store."""

    @property
    def count(self) -> int:
        return len(self.modules)


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def _chosen(name: str, targets: Sequence[str] | None) -> bool:
    return targets is None or name in targets or name.rpartition(".")[2] in targets


def quantizable_linears(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """The names of the ``nn.Linear`` modules :func:`quantize_model` converts: those ``targets`` names, by full name
    or last component (``("q_proj", "v_proj")``), by default every one but the output head. A :class:`TargetError`
    names a targeted module of another type, or says that nothing matched."""
    head = _output_head(model)
    chosen = [(name, module) for name, module in candidate_modules(model) if _chosen(name, targets)]
    if targets is not None:
        other = [(name, module) for name, module in chosen if type(module) is not nn.Linear and not
                 any(child for child in module.children())]
        if other:
            name, module = other[0]
            raise TargetError(f"module {name!r} is a {type(module).__name__}: lorakit quantizes only nn.Linear "
                              "layers (embeddings and norms stay in full precision)")
    names = [name for name, module in chosen if type(module) is nn.Linear and module is not head]
    if not names:
        raise TargetError(f"targets {targets!r} matched no nn.Linear of {type(model).__name__} to quantize "
                          "(the output head is never quantized)")
    return names


def quantize_model(model: nn.Module, config: NFConfig, targets: Sequence[str] | None = None) -> QuantizationSummary:
    """Replace ``nn.Linear`` modules of ``model`` (in place) by :class:`NFLinear` under ``config``: those
    :func:`quantizable_linears` chooses from ``targets``."""
    names = quantizable_linears(model, targets)
    bytes_before = bytes_after = 0
    for name in names:
        linear = model.get_submodule(name)
        quantized = NFLinear.from_linear(linear, config).train(linear.training)
        replace_module(model, name, quantized)
        bytes_before += linear.weight.nbytes
        bytes_after += quantized.quantized.nbytes
    return QuantizationSummary(tuple(names), bytes_before, bytes_after)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule ``name``."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)
