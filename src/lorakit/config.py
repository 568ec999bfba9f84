"""Frozen, validated configuration objects.

Every config is a ``@dataclass(frozen=True, kw_only=True)``; ``__post_init__`` validates without
mutating, and an error names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError

ALL_LINEAR = "all-linear"
"""Target shorthand: every linear layer (``nn.Linear`` and GPT-2 ``Conv1D``) except the output head."""

INITS = ("default", "gaussian", "zeros")


def _require(condition: bool, field_name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{field_name}: {pattern!r} is not a valid regular expression ({err})") from None


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """How one LoRA adapter is shaped and where it attaches (Hu et al. 2021; rsLoRA, Kalajdzievski 2023).

    The adapted layer computes ``h = W0 x + s * B A dropout(x)`` with ``A`` (r x d_in), ``B`` (d_out x r)
    and ``s = alpha / r``, or ``s = alpha / sqrt(r)`` with ``use_rslora``.
    """

    rank: int = 8
    """The rank ``r`` of ``B A``; a positive integer."""
    alpha: float = 8.0
    """The numerator of the scale ``s``; positive."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input only (the base path never sees it); in [0, 1)."""
    targets: str | tuple[str, ...] | list[str] = ALL_LINEAR
    """``"all-linear"``, a regular expression matched against the full module name, or a tuple of
    module names, each matching a module whose full name equals it or ends with ``"." + name``."""
    exclude: str | tuple[str, ...] | list[str] | None = None
    """Modules never to wrap, in the same forms as ``targets`` (``"all-linear"`` excepted)."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``s = alpha / sqrt(r)`` instead of ``alpha / r``."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: a key is a regular expression matched against the end of a module
    name (as ``re.match(rf"(.*\\.)?({key})$", name)``, PEFT's rule); the first match wins."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, matched like ``rank_pattern``."""
    init: str = "default"
    """``"default"``: A Kaiming-uniform, B = 0 (embeddings: A = 0, B normal), so the model starts
    unchanged; ``"gaussian"``: A ~ N(0, 1/r^2), B = 0; ``"zeros"``: A = B = 0."""

    def __post_init__(self) -> None:
        _require(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                 "rank", self.rank, "a positive integer is required")
        _require(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0,
                 "alpha", self.alpha, "a positive finite number is required")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                 "dropout", self.dropout, "a probability in [0, 1) is required")
        _require(self.init in INITS, "init", self.init, f"one of {', '.join(INITS)}")
        self._check_modules("targets", self.targets, allow_all_linear=True)
        if self.exclude is not None:
            self._check_modules("exclude", self.exclude, allow_all_linear=False)
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            _require(isinstance(rank, int) and rank > 0, f"rank_pattern[{key!r}]", rank,
                     "a positive integer is required")
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            _require(isinstance(alpha, (int, float)) and alpha > 0, f"alpha_pattern[{key!r}]", alpha,
                     "a positive number is required")

    @staticmethod
    def _check_modules(field_name: str, value: Any, *, allow_all_linear: bool) -> None:
        if isinstance(value, str):
            if value == ALL_LINEAR:
                _require(allow_all_linear, field_name, value, "'all-linear' is only meaningful for targets")
            else:
                _check_regex(field_name, value)
            return
        _require(isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, str) and v for v in value),
                 field_name, value, "'all-linear', a regular expression, or a non-empty tuple of module names")

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on ``module_name``, after ``rank_pattern``."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on ``module_name``, after ``alpha_pattern``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, module_name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) on ``module_name``."""
        rank = self.rank_for(module_name)
        denominator = math.sqrt(rank) if self.use_rslora else rank
        return self.alpha_for(module_name) / denominator


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """The first key of ``patterns`` that matches the end of ``module_name`` (PEFT's matching rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
