"""Temporary train/eval mode, restoring every submodule's own flag afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_mode(module: nn.Module, *, training: bool) -> Iterator[nn.Module]:
    """Inside the block ``module`` is in train (``training=True``) or eval mode; afterwards each
    submodule has the flag it had before (even where the flags were mixed), also after an error."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for submodule, flag in flags:
            submodule.training = flag


def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module_mode(module, training=False)``: no dropout inside the block."""
    return module_mode(module, training=False)
