"""MixLoRA's configuration, with MoE-PEFT's defaults (mixtures.md §2.3).

The aux-loss coefficient defaults to the code's 0.001 (MoE-PEFT uses it when a config leaves
``router_aux_loss_coef`` out, as its ``mixlora.json`` template does); the paper and README say 0.01.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class MixLoraConfig:
    """LoRA experts in every decoder block's FFN, a top-k router per block, plain LoRA on attention.

    Per block: ``p = softmax(W_g x)``, keep the top-k, renormalise, ``y = sum_j w_j E_{i_j}(x)`` with
    ``E_i(x) = W'_{2,i}(act(W'_{1,i} x) * W'_{3,i} x)`` and ``W'_{m,i} x = W_m x + s B_{m,i} A_{m,i} x``
    (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of
    Experts", arXiv 2404.15159).
    """

    num_experts: int = 8
    """E: LoRA experts per FFN, named ``expert0`` .. ``expert{E-1}``."""
    top_k: int = 2
    """Experts each token runs (their weights renormalised to sum to 1)."""
    rank: int = 16
    """LoRA rank of the experts and of the attention adapter."""
    alpha: float = 32.0
    """LoRA alpha (scale ``alpha / rank``) of the experts and of the attention adapter."""
    dropout: float = 0.05
    """LoRA dropout of the experts and of the attention adapter (MoE-PEFT's template: 0.05)."""
    attention_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Projections given the always-on ``attention`` adapter (module names or name endings); ``()``: none."""
    router_init_range: float = 0.02
    """Standard deviation of the routers' normal initialisation."""
    jitter_noise: float = 0.0
    """epsilon: in training the FFN input is multiplied by U(1 - epsilon, 1 + epsilon) before routing
    (the experts see the noisy input too, as in Mixtral); 0 turns it off."""
    aux_loss_coefficient: float = 0.001
    """c in ``c * L_aux``, the load-balancing loss (code default 0.001; the paper uses 0.01)."""

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        require(positive_int(self.num_experts), "num_experts", "a positive integer")
        require(positive_int(self.top_k) and self.top_k <= self.num_experts, "top_k",
                f"an integer in [1, num_experts={self.num_experts}]")
        require(positive_int(self.rank), "rank", "a positive integer")
        require(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0, "alpha",
                "a positive finite number")
        require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout",
                "a probability in [0, 1)")
        require(isinstance(self.attention_targets, tuple)
                and all(isinstance(t, str) and t for t in self.attention_targets), "attention_targets",
                "a tuple of non-empty module names")
        require(isinstance(self.router_init_range, (int, float)) and math.isfinite(self.router_init_range)
                and self.router_init_range > 0, "router_init_range", "a positive finite number")
        require(isinstance(self.jitter_noise, (int, float)) and 0.0 <= self.jitter_noise < 1.0, "jitter_noise",
                "a number in [0, 1)")
        require(isinstance(self.aux_loss_coefficient, (int, float)) and math.isfinite(self.aux_loss_coefficient)
                and self.aux_loss_coefficient >= 0, "aux_loss_coefficient", "a finite number >= 0")
