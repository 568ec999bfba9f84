"""The mean next-token loss of a model on encoded examples (no gradients, eval mode)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.core.modes import eval_mode
from lorakit.data.batching import collate
from lorakit.data.encoding import Encoded
from lorakit.models.supervised_loss import summed_loss, supervised_tokens


@torch.no_grad()
def loss_sums(model: nn.Module, encoded: Sequence[Encoded], *, batch_size: int, pad_id: int) -> tuple[float, int]:
    """``(sum of token losses, supervised tokens)`` over ``encoded`` (parts of a mean: several processes add
    theirs)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            batch = collate(list(encoded[start:start + batch_size]), pad_id=pad_id)
            total += float(summed_loss(model, batch))
            count += supervised_tokens(batch)
    return total, count


def mean_loss(model: nn.Module, encoded: Sequence[Encoded], *, batch_size: int, pad_id: int) -> float:
    """``sum of token losses / supervised tokens`` over ``encoded``, in order; ``nan`` when there are none."""
    total, count = loss_sums(model, encoded, batch_size=batch_size, pad_id=pad_id)
    return total / count if count else float("nan")
