"""Intruder mitigation: scale a LoRA adapter's intruder directions by ``λ``, written as a new adapter.

For each Linear/Conv1D module, with ``W_m = W_0 + ΔW = U Σ Vᵀ`` and ``I`` its intruders among the top
``k`` left singular vectors at ``ε`` (:mod:`lorakit.analysis.intruders`), the mitigated weight is

    W' = W_m + (λ - 1) Σ_{j in I} σ_j u_j v_jᵀ,      so   ΔW' = s B A + (λ - 1) U_I Σ_I V_Iᵀ

(Shuttleworth et al. 2024, v2; PEFT's ``reduce_intruder_dimension`` with defaults k = 10, ε = 0.5,
λ = 0.75). PEFT re-factors ``ΔW'`` at the old rank ``r``, which drops part of it; here the new
adapter holds ``ΔW'`` exactly at rank ``r + |I|``: ``A' = [A; V_Iᵀ]``, ``B' = [s B, (λ - 1) U_I Σ_I]``,
scale 1 (per-module rank and alpha patterns, as :mod:`lorakit.combine` writes them). Modules without
intruders keep ``A' = A``, ``B' = s B``; ``λ = 1`` is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.analysis.analyze import IntruderSettings
from lorakit.analysis.intruders import scan_intruders
from lorakit.analysis.subjects import base_weight
from lorakit.errors import ConfigError
from lorakit.io.adapters import ADAPTER_KIND
from lorakit.io.directory_kinds import directory_kind
from lorakit.io.factors import ModuleFactors, read_adapter_factors, unit_scale_fields, write_factor_adapter
from lorakit.models import DEFAULT_MODEL, load_model

MITIGATION_LAMBDA = 0.75


@dataclass(frozen=True)
class MitigationReport:
    """Where the mitigated adapter went, and the intruder directions scaled per module."""

    out: Path
    scale: float
    scaled: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.scaled.values())

    def summary(self) -> dict:
        return {"out": str(self.out), "lambda": self.scale, "directions_scaled": self.total,
                "modules_changed": sum(1 for n in self.scaled.values() if n)}


def mitigate_intruders(adapter: str | Path, out: str | Path, *, base: str | nn.Module = DEFAULT_MODEL,
                       scale: float = MITIGATION_LAMBDA, intruders: IntruderSettings = IntruderSettings(),
                       overwrite: bool = False, progress: bool = True) -> MitigationReport:
    """Write ``adapter`` with its intruder directions scaled by ``scale`` (λ) to ``out`` (atomically)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ConfigError(f"lambda={scale!r} is invalid: a finite number (0.75 is PEFT's default; 1 changes nothing)")
    directory = Path(out)
    if directory.resolve() == Path(adapter).resolve() or (directory.is_dir() and any(directory.iterdir())
                                                          and not overwrite):
        raise ConfigError(f"out={str(directory)!r} is the adapter itself or not empty; choose a new directory "
                          "(or pass overwrite=True for a non-empty one)")
    kind = directory_kind(Path(adapter))
    if kind.name != ADAPTER_KIND:
        raise ConfigError(f"{adapter} holds {kind.holds}: intruder mitigation rewrites a LoRA adapter's factors, "
                          "so it takes an adapter directory")
    source = read_adapter_factors(adapter)
    base_model = load_model(base)[0] if isinstance(base, (str, Path)) else base
    factors, keys, scaled = {}, {}, {}
    for module, pair in tqdm(source.modules.items(), desc="mitigate", unit="module", disable=not progress):
        factors[module], scaled[module] = _mitigated(pair, base_model, module, scale, intruders)
        keys[module] = pair.keys
    fields = unit_scale_fields({module: A.shape[0] for module, (A, _) in factors.items()})
    write_factor_adapter(directory, factors, keys, {**source.raw, **fields})
    return MitigationReport(directory, float(scale), scaled)


def _mitigated(pair: ModuleFactors, model: nn.Module, module: str, scale: float,
               intruders: IntruderSettings) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    A, B = pair.A, pair.scale * pair.B
    if not pair.is_linear or scale == 1:
        return (A, B), 0
    scan = scan_intruders(base_weight(model, module), pair.delta(), intruders.top_k)
    chosen = scan.intruders(intruders.epsilon)
    if not chosen:
        return (A, B), 0
    extra_B = (scale - 1) * scan.U[:, chosen].double() * scan.S[chosen].double()
    return (torch.cat([A, scan.Vh[chosen].double()]), torch.cat([B, extra_B], dim=1)), len(chosen)
