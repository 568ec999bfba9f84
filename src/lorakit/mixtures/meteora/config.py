"""MeteoRA's configuration (Xu, Lai, Huang 2024, arXiv 2405.13053; mixtures.md §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class MeteoraConfig:
    """How each adapted linear's own gate mixes the N task adapters.

    Per token ``x`` at a layer: ``z = W_g x`` (fp32, ``W_g`` is N x d_in, no bias), the ``top_k``
    largest logits ``v`` are kept and weighted ``softmax(v / temperature)``; the layer computes
    ``W0 x + sum_j w_j s_j B_j A_j x`` over the selected adapters only.
    """

    top_k: int = 2
    """Adapters per token and layer (the released checkpoints use 2; a top-1 variant also exists)."""
    temperature: float = 1.0
    """Divides the kept logits before the softmax; the paper's README raises it for composite tasks
    (15, 20, 30 for 3, 5, 10 sub-tasks). Single tasks: 1."""
    task_loss_weight: float = 1.0
    """lambda in ``CE_LM + lambda * CE_gate``. Our default is 1; the released training code hard-codes
    ``moe_aux_loss_coef = 50`` (mixtures.md §3.2) — pass 50 for parity."""
    gate_init_range: float = 0.02
    """Gate weights start uniform in ``[-r, r]``; 0 gives zero gates (all logits tie, so top-k then
    picks the first k adapters). 0.02 is our default, not a value from the paper."""
    train_adapters: bool = False
    """Also train the adapters' A and B (the released script trains gates and LoRA jointly);
    off (default): the gates alone are trainable."""

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"MeteoraConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        require(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1, "top_k",
                "a positive integer is required")
        require(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
                and math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                "a positive finite number is required")
        require(isinstance(self.task_loss_weight, (int, float)) and not isinstance(self.task_loss_weight, bool)
                and math.isfinite(self.task_loss_weight) and self.task_loss_weight >= 0, "task_loss_weight",
                "a finite number >= 0 is required")
        require(isinstance(self.gate_init_range, (int, float)) and not isinstance(self.gate_init_range, bool)
                and math.isfinite(self.gate_init_range) and self.gate_init_range >= 0, "gate_init_range",
                "a finite number >= 0 is required")
        require(isinstance(self.train_adapters, bool), "train_adapters", "True or False")
