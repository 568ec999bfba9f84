"""The result of EVA's data pass: per target module, its redistributed rank and the directions for ``A``.

A plain value (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation", arXiv 2410.07170): :func:`~lorakit.init.eva.eva_init.estimate_eva` makes it,
:func:`~lorakit.init.eva.eva_init.eva_config` and :func:`~lorakit.init.eva.eva_init.init_eva` consume it, and
:meth:`EvaEstimate.save` / :meth:`EvaEstimate.load` move it between processes as a directory holding
``eva.json`` (ranks, flags, settings) and ``eva.safetensors`` (the tensors), written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import FormatError
from lorakit.io.files import json_writer, load_json, load_tensors, tensor_writer, write_all_atomically

JSON_FILE = "eva.json"
TENSORS_FILE = "eva.safetensors"
_FORMAT = "lorakit-eva"
_TENSORS = ("components", "singular_values", "explained_variance_ratio")


@dataclass(frozen=True)
class EvaModule:
    """What EVA found for one target module; ``rank`` is ``r'_l``, the number of rows of ``components``."""

    components: torch.Tensor
    """(r', d_in): the top principal directions of the module's centred inputs, rows orthonormal."""
    singular_values: torch.Tensor
    """(r',): their singular values (``sqrt`` of the scatter along each direction; used to whiten)."""
    explained_variance_ratio: torch.Tensor
    """(k_l,): the explained-variance ratios of the top ``k_l = round(rho r_l)`` components, which
    competed for the rank budget."""
    base_rank: int
    """``r_l``: the rank the config gave this module before redistribution."""
    converged: bool
    """Whether the module's first ``r'`` components had settled (cosine >= tau between steps)."""
    group: str
    """The module whose identical input this module shares (itself when it shares none)."""

    @property
    def rank(self) -> int:
        return self.components.shape[0]


@dataclass(frozen=True)
class EvaEstimate:
    """EVA's per-module results, by full module name in model order."""

    modules: Mapping[str, EvaModule]
    batches: int
    """How many batches the incremental PCA consumed."""
    rho: float
    tau: float

    @property
    def ranks(self) -> dict[str, int]:
        """``r'_l`` per module (0: the module gets no adapter)."""
        return {name: module.rank for name, module in self.modules.items()}

    @property
    def budget(self) -> int:
        """``R = sum_l r_l``, which the redistributed ranks add up to."""
        return sum(module.base_rank for module in self.modules.values())

    @property
    def not_converged(self) -> list[str]:
        """The modules whose components had not settled when the batches ran out."""
        return [name for name, module in self.modules.items() if not module.converged]

    def __repr__(self) -> str:
        return (f"EvaEstimate({len(self.modules)} modules, budget={self.budget}, batches={self.batches}, "
                f"not_converged={len(self.not_converged)})")

    def save(self, path: str | Path) -> Path:
        """Write the estimate to the directory ``path`` (both files renamed into place together)."""
        directory = Path(path)
        tensors = {f"{name}.{key}": getattr(module, key) for name, module in self.modules.items() for key in _TENSORS}
        meta = {"format": _FORMAT, "version": 1, "batches": self.batches, "rho": self.rho, "tau": self.tau,
                "modules": {name: {"base_rank": m.base_rank, "rank": m.rank, "converged": m.converged,
                                   "group": m.group} for name, m in self.modules.items()}}
        write_all_atomically({directory / TENSORS_FILE: tensor_writer(tensors),
                              directory / JSON_FILE: json_writer(meta)})
        return directory

    @classmethod
    def load(cls, path: str | Path) -> EvaEstimate:
        """Read an estimate written by :meth:`save`; a :class:`FormatError` names what is wrong."""
        directory = Path(path)
        meta = load_json(directory / JSON_FILE)
        source = directory / JSON_FILE
        if meta.get("format") != _FORMAT or not isinstance(meta.get("modules"), dict):
            raise FormatError(f"{source}: not a lorakit EVA estimate (format {meta.get('format')!r})")
        tensors = load_tensors(directory / TENSORS_FILE)
        expected = {f"{name}.{key}" for name in meta["modules"] for key in _TENSORS}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise FormatError(f"{directory / TENSORS_FILE}: tensor {extra[0]!r} belongs to no module of {source}")
        modules = {name: _module(name, entry, tensors, directory) for name, entry in meta["modules"].items()}
        for key in ("rho", "tau"):
            if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), (int, float)):
                raise FormatError(f"{source}: the field {key!r} is {meta.get(key)!r}; a number is required")
        return cls(modules, batches=_integer(meta, "batches", source), rho=float(meta["rho"]), tau=float(meta["tau"]))


def _module(name: str, entry: Any, tensors: dict[str, torch.Tensor], directory: Path) -> EvaModule:
    """One module's entry, checked against its tensors."""
    source = directory / JSON_FILE
    if not isinstance(entry, dict) or not isinstance(entry.get("converged"), bool) \
            or not isinstance(entry.get("group"), str):
        raise FormatError(f"{source}: the entry of module {name!r} is {entry!r}; base_rank, rank, converged and "
                          "group are required")
    found = {}
    for key in _TENSORS:
        found[key] = tensors.get(f"{name}.{key}")
        if found[key] is None:
            raise FormatError(f"{directory / TENSORS_FILE}: missing tensor {name + '.' + key!r}")
    rank = _integer(entry, "rank", source)
    if found["components"].dim() != 2 or found["components"].shape[0] != rank \
            or tuple(found["singular_values"].shape) != (rank,) or found["explained_variance_ratio"].dim() != 1:
        raise FormatError(f"{directory / TENSORS_FILE}: the tensors of module {name!r} do not fit its rank {rank}: "
                          f"components {tuple(found['components'].shape)}, singular_values "
                          f"{tuple(found['singular_values'].shape)}")
    for key, tensor in found.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise FormatError(f"{directory / TENSORS_FILE}: tensor {name + '.' + key!r} is not finite floating point")
    return EvaModule(**found, base_rank=_integer(entry, "base_rank", source), converged=entry["converged"],
                     group=entry["group"])


def _integer(obj: dict, key: str, source: Path) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"{source}: the field {key!r} is {value!r}; a non-negative integer is required")
    return value
