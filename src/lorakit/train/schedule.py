"""The learning-rate schedule: linear warmup, then cosine decay.

``lr(t) = lr_max * t / w`` for ``t < w``; afterwards
``lr(t) = lr_max * (m + (1 - m) * (1 + cos(pi * p)) / 2)`` with ``p = (t - w) / (T - w)`` and
``m = min_lr_ratio``. A pure function of the step, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, total: int, warmup: int, peak: float, min_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
