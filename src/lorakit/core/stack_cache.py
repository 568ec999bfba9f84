"""Tensors derived from adapters' factors, kept while none of those factors changes.

Stacking many adapters' factors (mixtures, mixed batches) costs a copy per call; without autograd
the stack is reused until a parameter's in-place version counter moves, a parameter is replaced, or
an adapter's nested rank changes. With autograd the stack is always rebuilt, so gradients flow.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

from lorakit.core.adapter import LoraAdapter

T = TypeVar("T")


def factors_key(adapters: Sequence[LoraAdapter]) -> tuple:
    """What identifies the current factors of ``adapters``: each parameter's identity and version, and
    each adapter's nested rank."""
    return tuple((tuple((id(p), p._version) for p in a.parameters()), a.nested) for a in adapters)


def cached_without_grad(cache: dict, slot: str, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, reused from ``cache[slot]`` while ``key`` is unchanged and autograd is off."""
    if torch.is_grad_enabled():
        return build()
    cached = cache.get(slot)
    if cached is None or cached[0] != key:
        cached = cache[slot] = (key, build())
    return cached[1]
