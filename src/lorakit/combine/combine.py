"""Combining PEFT-format LoRA adapters on disk: ``cat`` (exact), ``svd`` (truncated, error reported) and
``linear`` (exact, or refused with the reason).

Adapter ``i`` with weight ``w_i`` changes module ``m`` by ``w_i s_i B_i A_i``, where ``s_i`` is its
scale on that module (``alpha/r`` or ``alpha/sqrt(r)`` with rsLoRA, after its rank and alpha
patterns: :meth:`LoraConfig.scale_for`) and ``B A`` means ``B.flatten(1) @ A.flatten(1)`` (Linear,
Conv1D, Conv2d and Embedding factors alike; A's rank axis is dim 0, B's is dim 1). The target is

    Δ_m = Σ_i w_i s_i B_i A_i            over the union of the adapters' modules (a missing one adds 0)

- ``cat``: ``A = [A_1; A_2; ...]`` (rank axis), ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, so ``B A = Δ``
  exactly with rank ``R_m = Σ r_i`` and ``alpha_m = R_m`` (scale 1, no rsLoRA).
- ``svd``: ``Δ = U S Vᵀ``, ``B = U_k S_k^½``, ``A = S_k^½ V_kᵀ``, scale 1, with
  ``k_m = min(rank, d_out, d_in, R_m)`` (``R_m`` bounds the rank of Δ, so no zero components are
  written). Δ is never formed: with ``B_cat = Q_b R_b`` and ``A_catᵀ = Q_a R_a`` (QR), ``Δ = Q_b (R_b
  R_aᵀ) Q_aᵀ`` and the SVD of the small ``R_b R_aᵀ`` gives Δ's. The report holds ``||Δ - Δ_k|| / ||Δ||``.
- ``linear``: where all adapters hold the same A on a module, ``A`` stays and ``B = Σ_i w_i (s_i/s_1)
  B_i`` under the first adapter's config (``s_1``); the same B: symmetrically. Summing both factors
  would add the cross terms ``w_i w_j B_i A_j`` (PEFT #3004), so anything else is refused. One adapter
  always qualifies: weight 1 writes it back unchanged.

PEFT's ``add_weighted_adapter`` bugs this avoids by construction: B left unweighted (#1155), cross
terms for negative weights (#3004), SVD scaled twice (#3111), rsLoRA ignored (#3449, #3761),
``rank_pattern`` results that do not reload (#3737; here one exact ``"^" + re.escape(module)`` key per
module whose rank differs from ``r``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.combine.report import CombineReport, TruncationError, overall_error
from lorakit.errors import ConfigError, FormatError
from lorakit.io.adapters import CONFIG_FILE
from lorakit.io.factors import AdapterFactors, Factors, read_adapter_factors, unit_scale_fields, write_factor_adapter


@dataclass(frozen=True)
class Source(AdapterFactors):
    """One input adapter's factors and its weight ``w_i``."""

    weight: float = 1.0


@dataclass(frozen=True)
class Combined:
    """A mode's result: per-module ``(A, B)``, the config fields it sets, and (svd) the truncation errors."""

    factors: dict[str, Factors]
    config_fields: dict
    errors: dict[str, TruncationError]


def combine_adapters(adapters: Sequence[tuple[str | Path, float]], out: str | Path, *, mode: str = "cat",
                     rank: int | None = None, allow_different_bases: bool = False,
                     overwrite: bool = False) -> CombineReport:
    """Write the adapter whose update is ``Σ_i w_i s_i B_i A_i`` over ``adapters = [(path, w_i), ...]`` to
    ``out`` (PEFT format, both files atomically; nothing is written if anything fails).

    ``mode``: ``"cat"`` (exact, ranks add), ``"svd"`` (rank-``rank`` truncation, error reported) or
    ``"linear"`` (exact factor sums where the adapters share A or B, else refused). Adapters recorded
    for different base models are refused unless ``allow_different_bases``; a non-empty ``out`` unless
    ``overwrite``.
    """
    entries = _checked_arguments(adapters, mode, rank)
    directory = _checked_out(out, overwrite)
    sources = [_read_source(path, weight) for path, weight in entries]
    _check_bases(sources, allow_different_bases)
    modules = _module_union(sources)
    combined = MODES[mode](modules, sources, rank)
    keys = {module: next(s.modules[module].keys for s in sources if module in s.modules) for module in modules}
    write_factor_adapter(directory, combined.factors, keys, _output_config(sources, combined.config_fields))
    return CombineReport(mode=mode, out=directory, adapters=tuple((str(s.path), s.weight) for s in sources),
                         ranks={m: A.shape[0] for m, (A, _) in combined.factors.items()},
                         relative_error=overall_error(list(combined.errors.values())),
                         module_errors={m: e.relative for m, e in combined.errors.items()})


def _checked_arguments(adapters, mode: str, rank: int | None) -> list[tuple[str | Path, float]]:
    """The (path, weight) pairs as a list, after checking them, ``mode`` and ``rank``."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is invalid: one of {sorted(MODES)}")
    entries = [] if isinstance(adapters, (str, Path)) else list(adapters)
    if not entries:
        raise ConfigError(f"adapters={adapters!r} is invalid: a non-empty list of (path, weight) pairs is required")
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ConfigError(f"adapters entry {entry!r} is invalid: a (path, weight) pair is required")
        if not _is_finite_number(entry[1]):
            raise ConfigError(f"the weight of {str(entry[0])!r} is {entry[1]!r}; a finite number is required")
    if mode == "svd":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank={rank!r} is invalid: mode 'svd' needs a positive integer rank to keep")
    elif rank is not None:
        raise ConfigError(f"rank={rank!r} applies to mode 'svd' only ({mode!r} fixes the ranks itself)")
    return entries


def _is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _checked_out(out: str | Path, overwrite: bool) -> Path:
    directory = Path(out)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"out={str(directory)!r} is a file; an adapter is a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(directory)!r} is not empty; pass overwrite=True (--overwrite) to write "
                          "the combined adapter's files into it")
    return directory


def _read_source(path: str | Path, weight: float) -> Source:
    return Source(**vars(read_adapter_factors(path)), weight=float(weight))


def _check_bases(sources: list[Source], allow_different_bases: bool) -> None:
    """Every module's base shape must agree; recorded base models too (by last path part, case-insensitively,
    as :func:`lorakit.load_adapter` compares them; an unrecorded one agrees with any) unless allowed."""
    first_seen: dict[str, Source] = {}
    for source in sources:
        for module, factors in source.modules.items():
            earlier = first_seen.setdefault(module, source)
            known = earlier.modules[module]
            if known.base_shape != factors.base_shape:
                raise FormatError(f"{source.path}: module {module!r} has A {tuple(factors.A.shape)} and B "
                                  f"{tuple(factors.B.shape)}, which do not fit {earlier.path}'s "
                                  f"{tuple(known.A.shape)} and {tuple(known.B.shape)}: the adapters belong to "
                                  "different base models")
    named = [s for s in sources if s.raw.get("base_model_name_or_path")]
    for source in named[1:]:
        first, other = named[0].raw["base_model_name_or_path"], source.raw["base_model_name_or_path"]
        if _base_stem(first) != _base_stem(other) and not allow_different_bases:
            raise ConfigError(f"{source.path / CONFIG_FILE}: base_model_name_or_path is {other!r}, but "
                              f"{named[0].path} was trained on {first!r}; pass allow_different_bases=True "
                              "(--allow-different-bases) if they really are the same weights")


def _base_stem(name: str) -> str:
    return Path(name.rstrip("/")).name.lower()


def _module_union(sources: list[Source]) -> list[str]:
    return sorted({module for source in sources for module in source.modules})


def _stacked(module: str, sources: list[Source]) -> Factors:
    """``A = [A_i]`` along the rank axis and ``B = [w_i s_i B_i]``, over the adapters holding ``module``:
    ``B.flatten(1) @ A.flatten(1)`` is exactly ``Δ_m``."""
    parts = [(s.weight, s.modules[module]) for s in sources if module in s.modules]
    A = torch.cat([factors.A for _, factors in parts])
    B = torch.cat([weight * factors.scale * factors.B for weight, factors in parts], dim=1)
    return A, B


def _cat(modules: list[str], sources: list[Source], rank: None) -> Combined:
    factors = {module: _stacked(module, sources) for module in modules}
    return Combined(factors, unit_scale_fields({m: A.shape[0] for m, (A, _) in factors.items()}), {})


def _svd(modules: list[str], sources: list[Source], rank: int) -> Combined:
    factors, errors = {}, {}
    for module in modules:
        A, B = _stacked(module, sources)
        factors[module], errors[module] = _truncated(A, B, rank)
    return Combined(factors, unit_scale_fields({m: A.shape[0] for m, (A, _) in factors.items()}), errors)


def _truncated(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[Factors, TruncationError]:
    """The best rank-``rank`` factors of ``Δ = B.flatten(1) @ A.flatten(1)`` (Eckart-Young), via QR of the factors."""
    q_b, r_b = torch.linalg.qr(B.flatten(1))  # (d_out, p), (p, R)
    q_a, r_a = torch.linalg.qr(A.flatten(1).T)  # (d_in, q), (q, R)
    u, singular_values, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # Δ = (q_b u) S (vh q_aᵀ)
    kept = min(rank, singular_values.numel())
    root = singular_values[:kept].sqrt()
    new_B = (q_b @ u[:, :kept]) * root  # (d_out, k)
    new_A = root[:, None] * (vh[:kept] @ q_a.T)  # (k, d_in)
    shaped = new_A.reshape(kept, *A.shape[1:]), new_B.reshape(B.shape[0], kept, *B.shape[2:])
    return shaped, TruncationError.of(singular_values, kept)


def _linear(modules: list[str], sources: list[Source], rank: None) -> Combined:
    factors = {}
    for module in modules:
        lacking = next((s for s in sources if module not in s.modules), None)
        if lacking is not None:
            raise ConfigError(f"mode 'linear': {lacking.path} has no adapter on module {module!r}, which "
                              "other adapters have; use mode 'cat' (exact, ranks add) or 'svd'")
        factors[module] = _shared_factor_sum(module, sources)
    return Combined(factors, {}, {})


def _shared_factor_sum(module: str, sources: list[Source]) -> Factors:
    """``(A, Σ c_i B_i)`` when every A is the same, ``(Σ c_i A_i, B)`` when every B is, with
    ``c_i = w_i s_i / s_1``; both are exactly ``Δ_m / s_1``."""
    scale_out = sources[0].modules[module].scale
    coefficients = [s.weight * s.modules[module].scale / scale_out for s in sources]
    As = [s.modules[module].A for s in sources]
    Bs = [s.modules[module].B for s in sources]
    if all(torch.equal(A, As[0]) for A in As[1:]):
        return As[0], sum(c * B for c, B in zip(coefficients, Bs, strict=True))
    if all(torch.equal(B, Bs[0]) for B in Bs[1:]):
        return sum(c * A for c, A in zip(coefficients, As, strict=True)), Bs[0]
    raise ConfigError(f"mode 'linear' is not exact on module {module!r}: the adapters share neither A nor B "
                      "there, and summing the factors, (Σ_i B_i)(Σ_j A_j), adds the cross terms B_i A_j (i != j); "
                      "use mode 'cat' (exact, ranks add) or 'svd' (truncated to a rank, error reported)")


def _output_config(sources: list[Source], fields: dict) -> dict:
    """The first adapter's ``adapter_config.json`` with the mode's fields; the base model is the first
    one recorded by any adapter."""
    raw = {**sources[0].raw, **fields}
    recorded = [s.raw["base_model_name_or_path"] for s in sources if s.raw.get("base_model_name_or_path")]
    if recorded:
        raw["base_model_name_or_path"] = recorded[0]
    return raw


Mode = Callable[[list[str], list[Source], int | None], Combined]
MODES: dict[str, Mode] = {"cat": _cat, "svd": _svd, "linear": _linear}
"""The combination modes: each maps (modules, sources, rank) to the factors and config fields it writes."""
