"""Activation checkpointing (``TrainConfig.gradient_checkpointing``): each decoder block keeps only its inputs in
the forward and runs again in the backward to rebuild what its gradients need (``torch.utils.checkpoint``,
non-reentrant: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

The activations kept for the backward shrink from every intermediate of every block to one hidden state per
block, at the cost of a second forward of each block in the backward (about a third more compute). Dropout draws
the same masks in the recomputation (the random state is saved with the inputs), the adapters are routed as they
were in the forward (the routing of that call is saved too and restored around the recomputation: X-LoRA's
scaling pass runs with its adapters off, its expert pass with per-token weights, and both have ended by the
backward), and what a forward records for the losses (:mod:`lorakit.core.records`) is recorded once: the
recomputation runs in the backward, outside any ``recording()``. So the gradients are the ones without
checkpointing, up to the rounding of the recomputed sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.core.routing import RoutingState
from lorakit.core.state import STATE_ATTR
from lorakit.train.sharding import decoder_blocks
from lorakit.train.wrapped_forward import wrapped_forwards


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every decoder block of ``model`` runs checkpointed whenever autograd records; afterwards
    each block's own ``forward`` is back as it was (including one set on the instance by someone else)."""
    if not enabled:
        yield
        return
    routing = next((state.routing for state in (getattr(m, STATE_ATTR, None) for m in model.modules()) if state),
                   None)  # the adapters' routing, on the model lorakit attached to (inside a mixture's wrapper)
    with wrapped_forwards(decoder_blocks(model, "--gradient-checkpointing"), partial(_checkpointed, routing=routing)):
        yield


def _checkpointed(forward: Callable, routing: RoutingState | None) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation inside training keeps nothing anyway
            return forward(*args, **kwargs)
        if routing is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        as_now = routing.snapshot()

        def routed_as_now(*args, **kwargs):
            with routing.restored(as_now):
                return forward(*args, **kwargs)

        return checkpoint(routed_as_now, *args, use_reentrant=False, **kwargs)
    return run
