"""The weight offset of LoRA-GA and the value that remembers it.

LoRA-GA starts the adapter at non-zero ``(A0, B0)``; to leave the model unchanged it subtracts the same
product from the base weight, ``W_init = W0 - s B0 A0`` (Wang, Yu, Li 2024, arXiv 2407.05000, Alg. 1).
The base is therefore no longer the original one, and whatever is saved later must account for
``s B0 A0``: :class:`LoraGaInit` holds ``A0``, ``B0`` and ``s`` per module as plain tensors for that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.core.kinds import kind_of
from lorakit.core.layer import LoraLayer
from lorakit.errors import FormatError
from lorakit.io.files import load_metadata, load_tensors, save_tensors

_SCALES_KEY = "lora_ga_scales"


@dataclass(frozen=True)
class LoraGaInit:
    """What :func:`~lorakit.init.lora_ga.lora_ga_init.init_lora_ga` did, per module name: ``A0`` (r, d_in), ``B0``
    (d_out, r), both fp32 on the CPU, and the LoRA scale ``s``; the base weight moved by ``-s B0 A0``."""

    A: Mapping[str, torch.Tensor]
    B: Mapping[str, torch.Tensor]
    scale: Mapping[str, float]

    @property
    def modules(self) -> list[str]:
        """The module names, in the order they were initialised."""
        return list(self.A)

    def save(self, path: str | Path) -> Path:
        """Write ``A0``/``B0`` as ``<module>.A0``/``<module>.B0`` to the safetensors file ``path``, the scales
        into its metadata (atomically); returns the path."""
        path = Path(path)
        tensors = {f"{m}.{key}": factors[m] for m in self.modules for key, factors in (("A0", self.A), ("B0", self.B))}
        save_tensors(path, tensors, metadata={_SCALES_KEY: json.dumps(dict(self.scale))})
        return path

    @classmethod
    def load(cls, path: str | Path) -> LoraGaInit:
        """Read a value written by :meth:`save`; a :class:`FormatError` names a foreign or broken file."""
        path = Path(path)
        tensors = load_tensors(path)
        raw = load_metadata(path).get(_SCALES_KEY)
        try:
            scales = json.loads(raw) if raw is not None else None
        except ValueError:
            scales = None
        if not isinstance(scales, dict) or not all(isinstance(v, (int, float)) for v in scales.values()):
            raise FormatError(f"{path}: not a lorakit LoRA-GA init (metadata {_SCALES_KEY!r} is {raw!r})")
        expected = {f"{m}.{key}" for m in scales for key in ("A0", "B0")}
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[0]
            raise FormatError(f"{path}: tensor {odd!r} is missing or belongs to no module of the recorded scales")
        return cls({m: tensors[f"{m}.A0"] for m in scales}, {m: tensors[f"{m}.B0"] for m in scales},
                   {m: float(v) for m, v in scales.items()})


def _base_of(model: nn.Module, module_name: str) -> nn.Module:
    """The base layer at ``module_name``, wrapped or not."""
    module = model.get_submodule(module_name)
    return module.base_layer if isinstance(module, LoraLayer) else module


@torch.no_grad()
def _shift_base(model: nn.Module, init: LoraGaInit, sign: float) -> None:
    """``W <- W + sign * s B0 A0`` for every module of ``init``, computed in fp32 in the base's layout; a base whose
    kind refuses merging (a quantized one, whose ``weight`` is computed) is refused before any weight moves."""
    bases = {module_name: _base_of(model, module_name) for module_name in init.modules}
    for module_name, base in bases.items():
        kind_of(base, module_name).check_merge(base, module_name)
    for module_name, base in bases.items():
        weight = base.weight
        A0, B0 = init.A[module_name].to(weight.device), init.B[module_name].to(weight.device)
        delta = kind_of(base, module_name).delta_weight(A0, B0) * (sign * init.scale[module_name])
        weight.copy_((weight.float() + delta).to(weight.dtype))


def offset_base(model: nn.Module, init: LoraGaInit) -> None:
    """Apply the LoRA-GA offset ``W <- W - s B0 A0`` to the original base weights. ``init_lora_ga`` does this
    itself; call it to rebuild a LoRA-GA model from a saved :class:`LoraGaInit`, e.g. to resume training
    from a checkpoint of the adapter on a freshly loaded base."""
    _shift_base(model, init, -1.0)


def restore_base(model: nn.Module, init: LoraGaInit) -> None:
    """Undo the LoRA-GA offset: ``W <- W + s B0 A0``, giving back the original base weights (up to the
    rounding of the weight's dtype). Works with the adapter attached or deleted."""
    _shift_base(model, init, +1.0)
