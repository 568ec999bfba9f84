"""``analyze``: what an adapter (or a full fine-tune) changed, module by module, as one JSON report.

Per analysed module: the singular spectrum of ``ΔW`` and its summary (:mod:`lorakit.analysis.spectrum`),
and the intruder scan of ``W_0 + ΔW`` against ``W_0`` (:mod:`lorakit.analysis.intruders`); in total the
intruder count at ``ε`` and over a sweep of ``ε``. With ``against``, the overlap of the two updates'
top singular subspaces per shared module (:mod:`lorakit.analysis.overlap`). The report's layout is
:data:`lorakit.analysis.report_schema.SCHEMA`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.analysis.intruders import EPSILON, EPSILONS, TOP_K, scan_intruders
from lorakit.analysis.overlap import OVERLAP_RANK, delta_overlap
from lorakit.analysis.report_schema import SCHEMA_NAME, check_report
from lorakit.analysis.spectrum import spectrum_summary
from lorakit.analysis.subjects import Subject, base_weight, load_subject
from lorakit.errors import ConfigError
from lorakit.models import DEFAULT_MODEL, load_model


@dataclass(frozen=True)
class IntruderSettings:
    """``k`` (top singular vectors scanned per matrix), the ``ε`` reported, and the ``ε`` sweep."""

    top_k: int = TOP_K
    epsilon: float = EPSILON
    epsilons: tuple[float, ...] = EPSILONS

    def __post_init__(self) -> None:
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ConfigError(f"top_k={self.top_k!r} is invalid: a positive integer")
        for value in (self.epsilon, *self.epsilons):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"epsilon {value!r} is invalid: a cosine threshold in (0, 1]")


def analyze(path: str | Path, *, base: str | nn.Module = DEFAULT_MODEL, against: str | Path | None = None,
            intruders: IntruderSettings = IntruderSettings(), overlap_rank: int | None = None,
            progress: bool = True) -> dict:
    """The analysis report of the adapter or model directory ``path`` on ``base`` (a name, a directory,
    or an already loaded model), optionally compared with ``against``."""
    base_model = load_model(base)[0] if isinstance(base, (str, Path)) else base
    subject = load_subject(path, base_model)
    if not subject.deltas:
        raise ConfigError(f"{path} changes no linear layer of the base model; there is nothing to analyse")
    modules = [_module_report(module, delta, base_weight(base_model, module), intruders)
               for module, delta in tqdm(subject.deltas.items(), desc="analyze", unit="module", disable=not progress)]
    report = {
        "schema": SCHEMA_NAME,
        "subject": {"path": subject.path, "kind": subject.kind},
        "base": base if isinstance(base, str) else getattr(base.config, "_name_or_path", None),
        "settings": {"top_k": intruders.top_k, "epsilon": intruders.epsilon, "epsilons": list(intruders.epsilons)},
        "modules": modules,
        "skipped": [{"module": module, "reason": reason} for module, reason in subject.skipped.items()],
        "totals": _totals(modules, intruders.epsilons),
        "against": None if against is None else _against(subject, load_subject(against, base_model), overlap_rank),
    }
    check_report(report)
    return report


def _module_report(module: str, delta, base: torch.Tensor, intruders: IntruderSettings) -> dict:
    _, singular_values, _ = delta.svd()
    scan = scan_intruders(base, delta.dense(), intruders.top_k)
    base_norm = float(base.double().norm())
    return {"module": module, "shape": list(delta.shape), **spectrum_summary(singular_values, delta.shape, base_norm),
            "max_cosines": [float(c) for c in scan.max_cosines], "intruders": scan.count(intruders.epsilon)}


def intruder_count(module_report: dict, epsilon: float) -> int:
    """A module report's intruder count at another ``epsilon`` (from its recorded cosines)."""
    return sum(cosine < epsilon for cosine in module_report["max_cosines"])


def _totals(modules: Sequence[dict], epsilons: Sequence[float]) -> dict:
    return {"modules": len(modules), "intruders": sum(m["intruders"] for m in modules),
            "intruders_by_epsilon": [{"epsilon": e, "intruders": sum(intruder_count(m, e) for m in modules)}
                                     for e in epsilons],
            "norm": sum(m["norm"] ** 2 for m in modules) ** 0.5,
            "mean_effective_rank": sum(m["effective_rank"] for m in modules) / len(modules)}


def _against(subject: Subject, other: Subject, overlap_rank: int | None) -> dict:
    shared = [module for module in subject.deltas if module in other.deltas]
    if not shared:
        raise ConfigError(f"{subject.path} and {other.path} update no module in common; there is no overlap to "
                          "measure")
    rank = overlap_rank or _natural_rank(subject, other)
    rows = [{"module": module, **delta_overlap(subject.deltas[module], other.deltas[module], rank)}
            for module in shared]
    return {"path": other.path, "kind": other.kind, "rank": rank, "modules": rows,
            "mean_left": sum(r["left"] for r in rows) / len(rows),
            "mean_right": sum(r["right"] for r in rows) / len(rows)}


def _natural_rank(*subjects: Subject) -> int:
    """The smaller adapter rank of the two (a full update has none of its own: :data:`OVERLAP_RANK`)."""
    ranks = [s.factors.config.rank for s in subjects if s.factors is not None]
    return min(ranks) if ranks else OVERLAP_RANK
