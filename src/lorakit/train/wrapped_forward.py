"""Running modules' ``forward`` wrapped for a while (compiled, checkpointed), then exactly as before."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import nn


@contextlib.contextmanager
def wrapped_forwards(modules: Sequence[nn.Module], wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Within the block, each module's ``forward`` is ``wrap(forward)``; afterwards each module's own ``forward`` is
    back as it was, including one set on the instance by someone else (a hook library's wrapper)."""
    own = [vars(module).get("forward") for module in modules]  # instance attributes, or None
    for module in modules:
        module.forward = wrap(module.forward)
    try:
        yield
    finally:
        for module, forward in zip(modules, own, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
