"""Tensors derived from adapters' factors, kept while none of those factors changes.

Stacking many adapters' factors (mixtures, mixed batches) costs a copy per call; without autograd
the stack is reused while its key is unchanged. The key holds everything the factors' values depend
on: each parameter's identity, storage, in-place version counter, dtype and device (``model.to(...)``
and ``p.data = ...`` keep the parameter object and its version but replace its storage), and each
adapter's nested rank and scale. With autograd the stack is always rebuilt, so gradients flow.

Writes through ``p.data`` bypass the version counter (PyTorch gives ``.data`` a counter of its own):
update parameters in place under ``torch.no_grad()`` instead, as optimizers do.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

from lorakit.core.adapter import LoraAdapter

T = TypeVar("T")


def factors_key(adapters: Sequence[LoraAdapter]) -> tuple:
    """What identifies the current factors of ``adapters`` (see the module docstring)."""
    return tuple((_parameters_key(a), a.nested, a.scale, a.alpha, a.rslora) for a in adapters)


def _parameters_key(adapter: LoraAdapter) -> tuple:
    # A, B and CoDyRA's gate straight from _parameters: parameters() alone costs more than this whole key
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device)
                 for p in adapter._parameters.values() if p is not None)


def cached_stack(cache: dict, slot: str, adapters: Sequence[LoraAdapter], build: Callable[[], T],
                 extra: Hashable = ()) -> T:
    """``build()``, reused from ``cache[slot]`` while autograd is off and neither the factors of ``adapters``
    (:func:`factors_key`) nor ``extra`` (what else the stack depends on) changed."""
    if torch.is_grad_enabled():
        return build()
    key = (extra, factors_key(adapters))
    cached = cache.get(slot)
    if cached is None or cached[0] != key:
        cached = cache[slot] = (key, build())
    return cached[1]
