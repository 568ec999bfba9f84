"""Tensors derived from adapters' factors, kept while none of those factors changes.

Stacking many adapters' factors (mixtures, mixed batches) costs a copy per call; without autograd
the stack is reused while its key is unchanged. The key holds everything the factors' values depend
on: each parameter's identity, storage and in-place version counter (``model.to(...)`` and ``p.data = ...``
keep the parameter object and its version but replace its storage), the dtype and device of the first
(a whole model converted), and each adapter's nested rank and scale. With autograd the stack is always
rebuilt, so gradients flow. The key is read at every call, so it reads each parameter a few attributes
and nothing more (a mixed batch over 32 adapters checks 64 parameters per layer).

Writes through ``p.data`` bypass the version counter (PyTorch gives ``.data`` a counter of its own):
update parameters in place under ``torch.no_grad()`` instead, as optimizers do.

A caller that never changes factors in place (a server: it loads adapters, serves them and unloads them;
a generation loop over fixed adapters) can say so with :func:`frozen_factors`; inside it a stack is checked
only for which adapter modules it holds, so a decode step does not read every parameter of every adapter of
every layer (a mixed decode step over 32 adapters on q, v, down reads 5,760 parameters: about a tenth of
the step on this project's CPU). A stack built outside the block is reused inside it, and one built inside
is checked in full once the block is left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from lorakit.core.adapter import LoraAdapter

T = TypeVar("T")


_FROZEN = threading.local()


@contextmanager
def frozen_factors() -> Iterator[None]:
    """Inside the block (on this thread) the caller promises that no adapter's factors change in place, and that
    an adapter replaced by another comes under another name: cached stacks are then keyed by which adapter
    modules they hold (:func:`factors_key`), without reading their parameters."""
    previous = getattr(_FROZEN, "on", False)
    _FROZEN.on = True
    try:
        yield
    finally:
        _FROZEN.on = previous


def factors_key(adapters: Sequence[LoraAdapter]) -> tuple[tuple[int, ...], tuple | None]:
    """What identifies the current factors of ``adapters``: which adapter modules they are, and what their
    values depend on (see the module docstring), or None inside :func:`frozen_factors`."""
    modules = tuple(map(id, adapters))
    if getattr(_FROZEN, "on", False):
        return modules, None
    parameters = [p for a in adapters for p in a._parameters.values() if p is not None]  # A, B, CoDyRA's gate
    first = parameters[0] if parameters else None
    return modules, (None if first is None else (first.dtype, first.device), tuple(map(id, parameters)),
                     tuple(p.data_ptr() for p in parameters), tuple(p._version for p in parameters),
                     tuple((a.nested, a.scale, a.alpha, a.rslora) for a in adapters))


def cached_stack(cache: dict, slot: str, adapters: Sequence[LoraAdapter], build: Callable[[], T],
                 extra: Hashable = (), key: tuple | None = None) -> T:
    """``build()``, reused from ``cache[slot]`` while autograd is off and neither the factors of ``adapters``
    (:func:`factors_key`, or ``key`` when the caller computed it) nor ``extra`` (what else the stack depends
    on) changed. Inside :func:`frozen_factors` the values are taken as unchanged."""
    if torch.is_grad_enabled():
        return build()
    modules, values = factors_key(adapters) if key is None else key
    cached = cache.get(slot)
    if cached is None or cached[0] != (extra, modules) or (values is not None and cached[1] != values):
        cached = cache[slot] = ((extra, modules), values, build())
    return cached[2]
