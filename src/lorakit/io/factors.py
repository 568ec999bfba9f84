"""A PEFT-format LoRA adapter as float64 factors per module, read and written without a model.

Module ``m`` of an adapter changes the base weight by ``scale_m · B.flatten(1) @ A.flatten(1)``
(Linear, Conv1D, Conv2d and Embedding factors alike: A's rank axis is dim 0, B's is dim 1), with
``scale_m`` its own scale after the rank and alpha patterns and rsLoRA (:meth:`LoraConfig.scale_for`).
Adapter combination (:mod:`lorakit.combine`) and intruder mitigation (:mod:`lorakit.analysis`) both
read adapters this way and write their results as scale-1 adapters with one exact pattern key per
module whose rank differs (which PEFT reloads).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, FormatError
from lorakit.io.adapters import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, read_adapter, write_adapter_files

# The tensor-name suffixes of a module's (A, B) pair: linear-like layers, embeddings.
FACTOR_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B) of one module, in PEFT's layout


@dataclass(frozen=True)
class ModuleFactors:
    """One adapter's factors on one module (float64): its update is ``scale · B.flatten(1) @ A.flatten(1)``."""

    A: torch.Tensor  # (r, d_in) or (r, d_in, kh, kw)
    B: torch.Tensor  # (d_out, r) or (d_out, r, 1, 1)
    scale: float
    keys: tuple[str, str]

    @property
    def base_shape(self) -> tuple:
        """What the base layer fixes: the key names, A's shape past the rank axis, B's."""
        return self.keys, tuple(self.A.shape[1:]), self.B.shape[0], tuple(self.B.shape[2:])

    @property
    def is_linear(self) -> bool:
        """Whether this is a Linear/Conv1D pair (2-D factors with PEFT's ``lora_A.weight`` keys)."""
        return self.keys == FACTOR_KEYS[0] and self.A.dim() == 2

    def delta(self) -> torch.Tensor:
        """The dense update ``scale · B A`` (d_out, d_in...) flattened to 2-D."""
        return self.scale * (self.B.flatten(1) @ self.A.flatten(1))


@dataclass(frozen=True)
class AdapterFactors:
    """One adapter on disk: where it came from, its config (parsed and raw) and per-module factors."""

    path: Path
    config: LoraConfig
    raw: dict
    modules: dict[str, ModuleFactors]


def read_adapter_factors(path: str | Path) -> AdapterFactors:
    """The adapter at ``path`` as float64 factors with each module's scale; its tensors are checked
    (a LoRA pair per module, ranks as the config says, finite floats) and an error names the file."""
    config, raw, tensors = read_adapter(path)
    weights_file = Path(path) / WEIGHTS_FILE
    modules = {module: _module_factors(module, found, config, weights_file)
               for module, found in _group_by_module(tensors, weights_file).items()}
    if not modules:
        raise FormatError(f"{weights_file}: holds no LoRA tensors")
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise FormatError(f"{Path(path) / CONFIG_FILE}: base_model_name_or_path is {base!r}; a string or null "
                          "is required")
    return AdapterFactors(path=Path(path), config=config, raw=raw, modules=modules)


def _group_by_module(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {key suffix: tensor}}``; any tensor that is not a LoRA factor is refused."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    suffixes = [suffix for pair in FACTOR_KEYS for suffix in pair]
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.startswith(KEY_PREFIX) and key.endswith("." + s)), None)
        if suffix is None:
            raise FormatError(f"{source}: tensor {key!r} is not a LoRA factor ({KEY_PREFIX}<module>.lora_A.weight, "
                              "lora_B.weight, lora_embedding_A or lora_embedding_B); only plain LoRA adapters "
                              "can be read as factors")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise FormatError(f"{source}: tensor {key!r} is not finite floating-point data ({tensor.dtype})")
        grouped.setdefault(key[len(KEY_PREFIX):-len(suffix) - 1], {})[suffix] = tensor
    return grouped


def _module_factors(module: str, found: dict[str, torch.Tensor], config: LoraConfig, source: Path) -> ModuleFactors:
    keys = next((pair for pair in FACTOR_KEYS if set(pair) == set(found)), None)
    if keys is None:
        raise FormatError(f"{source}: module {module!r} has tensors {sorted(found)}; one A/B pair "
                          f"({' + '.join(FACTOR_KEYS[0])} or {' + '.join(FACTOR_KEYS[1])}) is required")
    A, B = found[keys[0]].double(), found[keys[1]].double()
    rank = config.rank_for(module)
    plain = A.dim() == B.dim() == 2
    conv = A.dim() == B.dim() == 4 and tuple(B.shape[2:]) == (1, 1)
    if not (plain or conv) or not A.shape[0] == B.shape[1] == rank:
        raise FormatError(f"{source}: module {module!r} has A {tuple(A.shape)} and B {tuple(B.shape)}, but "
                          f"A (r, d_in[, kh, kw]) and B (d_out, r[, 1, 1]) with r = {rank} (from "
                          f"{CONFIG_FILE}) are required")
    return ModuleFactors(A=A, B=B, scale=config.scale_for(module), keys=keys)


def unit_scale_fields(ranks: dict[str, int]) -> dict:
    """Config fields giving module ``m`` rank ``ranks[m]`` and scale 1: ``r`` and ``lora_alpha`` the
    most common rank, and one exact pattern key per module whose rank differs (PEFT reloads these)."""
    counts = Counter(ranks.values())
    common = max(counts, key=lambda value: (counts[value], value))
    pattern = {"^" + re.escape(module): value for module, value in ranks.items() if value != common}
    return {"r": common, "lora_alpha": common, "use_rslora": False, "rank_pattern": pattern,
            "alpha_pattern": dict(pattern), "target_modules": sorted(ranks), "exclude_modules": None}


def write_factor_adapter(directory: Path, factors: dict[str, Factors], keys: dict[str, tuple[str, str]],
                         config: dict) -> None:
    """Write ``factors`` (module -> (A, B), saved under the module's PEFT ``keys``) as float32 with
    ``config`` as ``adapter_config.json`` (and ``lorakit.json``), all atomically; float32 overflow is refused first."""
    tensors = {}
    for module, pair in factors.items():
        for key, value in zip(keys[module], pair, strict=True):
            single = value.float().contiguous()
            if not torch.isfinite(single).all():
                raise ConfigError(f"the new {key} of module {module!r} overflows float32; use smaller weights")
            tensors[f"{KEY_PREFIX}{module}.{key}"] = single
    write_adapter_files(directory, tensors, config)
