"""ALLoRA: an Adam(W) whose per-row step shrinks as the row's norm grows (Huang & Balestriero 2024).

"ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692. ALLoRA is LoRA without
dropout and without the scale (``s = 1``, ``delta = B A``) in which "the per-sample and per-parameter
gradients are scaled by a coefficient inversely proportional to the parameters' l2 norm". No official
code was found; the formula below is the working one of the spec (unverified against Sec. 4 of the paper).
For every row ``theta_i`` of A and of B::

    c_i = 1 / sqrt(||theta_i||^2 + 1 / eta^2)

so ``c = eta`` at ``theta = 0`` (B at init) and ``c -> 1 / ||theta_i||`` for large norms. The coefficient
depends on the parameters only, so scaling each sample's gradient equals scaling the batch gradient.

Where the coefficient applies (``scale``):

- ``"update"`` (default): the paper calls ``c`` an adaptive *learning rate*, and under Adam a gradient
  scale is cancelled by the second-moment normalisation, so ``c`` multiplies the Adam update row-wise::

      theta_i <- theta_i - lr * c_i * m_hat_i / (sqrt(v_hat_i) + eps) - lr * wd * theta_i

  with ``c`` computed from the parameters before the step, and decoupled weight decay (AdamW, not
  scaled by ``c``; default 0).
- ``"gradient"``: the literal reading; ``g_i <- c_i g_i`` before the Adam moments, then plain Adam(W).

``eta`` defaults to 1.0: the paper's value is not in its abstract, and 1.0 gives ``c = 1`` at ``B = 0``,
i.e. the base learning rate at the start. Rows: ``p[i, :]`` of a 2-D parameter, ``p[i].flatten()`` of a
higher-dimensional one (Conv2d A ``(r, in, kh, kw)``, B ``(out, r, 1, 1)``); a 1-D parameter is one row.
Attach the adapter with ``alpha == rank`` and ``dropout = 0`` to get the paper's setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor

from lorakit.errors import ConfigError

SCALES = ("update", "gradient")


def _check_eta(eta: Any) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ConfigError(f"eta={eta!r} is invalid: a positive finite number is required")


def _rows(parameter: Tensor) -> Tensor:
    """The parameter as a (rows x features) matrix; a 0-D or 1-D parameter is a single row."""
    if parameter.dim() < 2:
        return parameter.reshape(1, -1)
    return parameter.reshape(parameter.shape[0], -1)


def allora_coefficients(parameter: Tensor, eta: float) -> Tensor:
    """``c_i = 1 / sqrt(||theta_i||^2 + 1/eta^2)`` for every row of ``parameter`` (float32, one per row)."""
    _check_eta(eta)
    squared_norms = _rows(parameter.detach()).float().pow(2).sum(dim=1)
    return torch.rsqrt(squared_norms + 1.0 / eta**2)


def _broadcast_rows(coefficients: Tensor, parameter: Tensor) -> Tensor:
    """Per-row coefficients shaped to multiply ``parameter`` (or a tensor of its shape) element-wise."""
    if parameter.dim() < 2:
        return coefficients.reshape(()).to(parameter.dtype)
    return coefficients.reshape(-1, *([1] * (parameter.dim() - 1))).to(parameter.dtype)


class Allora(torch.optim.Optimizer):
    """Adam(W) with the ALLoRA row coefficient on the update (default) or on the gradient; see the module."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 2e-4, eta: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 scale: str = "update") -> None:
        _check_eta(eta)
        if scale not in SCALES:
            raise ConfigError(f"scale={scale!r} is invalid: one of {', '.join(SCALES)}")
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ConfigError(f"lr={lr!r} is invalid: a non-negative number is required")
        if not (len(betas) == 2 and all(0.0 <= beta < 1.0 for beta in betas)):
            raise ConfigError(f"betas={betas!r} is invalid: two numbers in [0, 1) are required")
        if not eps >= 0:
            raise ConfigError(f"eps={eps!r} is invalid: a non-negative number is required")
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay={weight_decay!r} is invalid: a non-negative number is required")
        defaults = {"lr": lr, "eta": eta, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "scale": scale}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step for every parameter that has a gradient; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._step_parameter(parameter, group)
        return loss

    def _state_of(self, parameter: Tensor) -> dict[str, Any]:
        state = self.state[parameter]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        return state

    def _step_parameter(self, parameter: Tensor, group: dict[str, Any]) -> None:
        if parameter.grad.is_sparse:
            raise ConfigError("Allora does not support sparse gradients: use dense embeddings")
        coefficients = _broadcast_rows(allora_coefficients(parameter, group["eta"]), parameter)
        gradient = parameter.grad * coefficients if group["scale"] == "gradient" else parameter.grad
        state = self._state_of(parameter)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(gradient, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        update = state["exp_avg"] / (1 - beta1**step) / denominator
        if group["scale"] == "update":
            update.mul_(coefficients)
        if group["weight_decay"]:
            parameter.mul_(1 - group["lr"] * group["weight_decay"])
        parameter.sub_(update, alpha=group["lr"])
