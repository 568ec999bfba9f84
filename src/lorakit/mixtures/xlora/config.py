"""X-LoRA's configuration, with PEFT's ``XLoraConfig`` fields and defaults (mixtures.md §1.6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class XLoraConfig:
    """How the X-LoRA classifier turns hidden states into per-token, per-layer expert scalings.

    ``sigma = softmax(classifier(h) / temperature)`` over the N experts, where ``h`` is the last hidden
    state of the scaling pass; shape ``(batch, seq, L, N)`` with L the number of adapted modules
    (Buehler & Buehler 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts").
    """

    enable_softmax: bool = True
    """Softmax over the experts (per token and layer); off: the raw classifier outputs."""
    softmax_temperature: float = 1.0
    """Divides the classifier logits before the softmax."""
    layerwise_scalings: bool = False
    """One scaling vector per adapted module (the classifier outputs L*N); off: one, broadcast to all."""
    top_k: int | None = None
    """Keep each token's k largest scalings and zero the rest (no renormalisation); only those
    experts are computed. ``None``: dense."""
    enable_softmax_topk: bool = False
    """With ``top_k``: a per-token softmax over the kept scalings (the others stay 0)."""
    depth: int = 1
    """Classifier layers: 1 is a single linear map; D >= 2 is Linear-ReLU(-Dropout) x (D-1), Linear."""
    size: int = 2048
    """Hidden width of a classifier deeper than 1."""
    dropout: float = 0.2
    """Dropout between the hidden classifier layers (depth >= 2 only)."""
    trainable_experts: bool = False
    """Train the experts' A and B with the classifier; off (default): only the classifier trains."""
    scaling_pass_value: float | None = 0.0
    """The experts' weight in the scaling pass; 0 makes it the base model, ``None`` means 1/N."""
    global_scaling_weight: float = 1.0
    """``g``: multiplies every expert term in the real pass."""

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        require(self.softmax_temperature > 0 and math.isfinite(self.softmax_temperature), "softmax_temperature",
                "a positive finite number is required")
        require(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1), "top_k",
                "None or a positive integer")
        require(not self.enable_softmax_topk or self.top_k is not None, "enable_softmax_topk",
                "it needs top_k")
        require(isinstance(self.depth, int) and self.depth >= 1, "depth", "a positive integer")
        require(isinstance(self.size, int) and self.size >= 1, "size", "a positive integer")
        require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")
        require(self.scaling_pass_value is None or math.isfinite(self.scaling_pass_value), "scaling_pass_value",
                "a finite number or None")
        require(math.isfinite(self.global_scaling_weight), "global_scaling_weight", "a finite number")

    def pass_value(self, n_experts: int) -> float:
        """The scaling-pass weight of every expert."""
        return 1.0 / n_experts if self.scaling_pass_value is None else self.scaling_pass_value
