"""LoRA-Pro: steer the LoRA factors so that their step matches a full fine-tuning (Adam) step.

Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025; released code
mrflogs/LoRA-Pro (``lorapro_full_adjustment`` in its DeepSpeed fork). Reference: variants.md §5.

All matrices are the 2-D views of :mod:`lorakit.optim.factor_pairs`: ``A`` (r x n), ``B`` (m x r), the update
``s B A`` and the full gradient ``G`` (m x n), so ``gA = s B^T G`` and ``gB = s G A^T``. A LoRA step with
gradients ``(ĝA, ĝB)`` moves ``W`` by ``-lr * g̃`` with the *equivalent gradient* ``g̃ = s B ĝA + s ĝB A``.
LoRA-Pro minimises ``||g̃ - G||_F``; for ``B`` of full column rank, ``A`` of full row rank and any r x r ``X``::

    ĝA = (1/s²) (BᵀB)⁻¹ gA + X A
    ĝB = (1/s²) [I - B (BᵀB)⁻¹ Bᵀ] gB (AAᵀ)⁻¹ - B X

gives ``g̃ = P_B G + (I - P_B) G P_A`` (``P_B``, ``P_A``: projectors onto B's columns and A's rows), whatever
``X``. The ``X`` closest to plain LoRA (minimum ``||ĝA - gA||² + ||ĝB - gB||²``) solves the Sylvester equation
``(BᵀB) X + X (AAᵀ) = -(1/s²) (BᵀB)⁻¹ gA Aᵀ`` (exactly the minimiser when ``gA Aᵀ = Bᵀ gB``, as for any
gradients of the form ``s BᵀG, s G Aᵀ``). Inverses are ``pinv(· + δI)``. When ``B = 0`` (the first step
of the standard init) the formulas above do not apply and ``ĝA = gA``, ``ĝB = (1/s²) gB pinv(AAᵀ + δI)``,
which gives ``g̃ = G P_A``.

One optimizer step, per pair: (1) ``g̃`` from the raw gradients with ``X = 0``; (2) Adam moments of the
full ``g̃`` and the direction ``u = m̂ / (√v̂ + eps)``; (3) ``(ĝA, ĝB)`` from ``(s Bᵀu, s u Aᵀ)`` with the
Sylvester ``X``; (4) plain SGD on the factors, ``p -= lr * ĝ`` (after decoupled weight decay, if any).

Quirks of the released code we do not copy: it hard-codes ``s = 2`` (16/8, even with rsLoRA), where we
use each adapter's own scale; it updates ``v`` in bf16, where we keep the moments in the parameters'
dtype (fp32 for lorakit's factors). The factor-sized work (r x r Gram matrices, their inverses, the
Sylvester solve, ``ĝA``, ``ĝB``) is done in float64 and cast back; the m x n work in the parameters' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lorakit.errors import ConfigError
from lorakit.optim.factor_pairs import LoraFactors
from lorakit.optim.sylvester import solve_symmetric_sylvester


def _regularised_pinv(gram: torch.Tensor, delta: float) -> torch.Tensor:
    """``pinv(gram + delta I)`` for a symmetric PSD r x r ``gram``."""
    return torch.linalg.pinv(gram + delta * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                             hermitian=True)


def adjusted_gradients(A2: torch.Tensor, B2: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, scale: float,
                       delta: float = 1e-8, solve_x: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's ``(ĝA, ĝB)`` (r x n, m x r) for factors ``A2`` (r x n), ``B2`` (m x r) and gradients ``gA``, ``gB``.

    With ``solve_x`` the Sylvester ``X`` is used, otherwise ``X = 0``; see the module docstring for the
    formulas and the ``B = 0`` case. Computed in float64, returned in ``gA``'s and ``gB``'s dtypes.
    """
    A, B, grad_A, grad_B = (t.double() for t in (A2, B2, gA, gB))
    inverse_scale_sq = 1.0 / scale**2
    gram_A = A @ A.T  # (r, r)
    if not B.any():
        return gA.clone(), (inverse_scale_sq * grad_B @ _regularised_pinv(gram_A, delta)).to(gB.dtype)
    gram_B = B.T @ B  # (r, r)
    gram_B_inverse = _regularised_pinv(gram_B, delta)
    hat_A = inverse_scale_sq * gram_B_inverse @ grad_A  # (r, n)
    outside_B = grad_B - B @ (gram_B_inverse @ (B.T @ grad_B))  # (I - P_B) gB, (m, r)
    hat_B = inverse_scale_sq * outside_B @ _regularised_pinv(gram_A, delta)  # (m, r)
    if solve_x:
        X = solve_symmetric_sylvester(gram_B, gram_A, -hat_A @ A.T, delta)  # (r, r)
        hat_A, hat_B = hat_A + X @ A, hat_B - B @ X
    return hat_A.to(gA.dtype), hat_B.to(gB.dtype)


def equivalent_gradient(A2: torch.Tensor, B2: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, scale: float,
                        delta: float = 1e-8) -> torch.Tensor:
    """``g̃ = s B ĝA + s ĝB A`` (m x n) with ``(ĝA, ĝB)`` of :func:`adjusted_gradients` at ``X = 0``.

    ``g̃`` does not depend on ``X``; it is ``P_B G + (I - P_B) G P_A`` (``G P_A`` when ``B = 0``) for
    exact gradients ``gA = s BᵀG``, ``gB = s G Aᵀ``. One m x n buffer, in ``A2``'s dtype.
    """
    hat_A, hat_B = adjusted_gradients(A2, B2, gA, gB, scale, delta, solve_x=False)
    return (B2 @ hat_A).addmm_(hat_B, A2).mul_(scale)


def lora_pro_state_bytes(pairs: Sequence[LoraFactors]) -> int:
    """Bytes of :class:`LoraPro`'s state: two m x n moments per pair, in the parameters' dtype."""
    return sum(2 * _full_shape(pair.A, pair.B).numel() * pair.A.element_size() for pair in _checked_pairs(pairs))


class LoraPro(torch.optim.Optimizer):
    """LoRA-Pro (Wang et al., ICLR 2025): Adam on each pair's equivalent gradient, SGD on the factors.

    ``pairs`` come from :func:`lorakit.optim.factor_pairs.lora_factors`. The one param group's ``"params"``
    are ``[A1, B1, A2, B2, ...]`` (the trainer sets ``group["lr"]`` and clips over them) and its
    ``"scales"`` the pairs' scales, so the pairing survives ``state_dict()``/``load_state_dict()``. Each
    pair's state lives under its ``A``: ``"step"`` (int), ``"exp_avg"`` and ``"exp_avg_sq"`` (m x n).

    Memory: the Adam moments are full size, ``2 m n`` floats per adapted matrix, about what full
    fine-tuning's optimizer needs for those weights (:func:`lora_pro_state_bytes` gives the total), plus a
    transient m x n buffer per pair during ``step()``. Compute: O(m n r) per pair and step.

    ``step()`` updates the factors directly and leaves ``.grad`` as it found it (the raw gradients; the
    released code overwrites them with ``ĝ`` before its SGD step). A pair whose gradients are both
    ``None`` is skipped; one ``None`` gradient counts as zero.
    """

    def __init__(self, pairs: Sequence[LoraFactors], lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, delta: float = 1e-8, weight_decay: float = 0.0) -> None:
        pairs = _checked_pairs(pairs)
        betas = _checked_hyperparameters(lr, betas, eps, delta, weight_decay)
        group = {"params": [p for pair in pairs for p in (pair.A, pair.B)],
                 "scales": [float(pair.scale) for pair in pairs]}
        defaults = {"lr": lr, "betas": betas, "eps": eps, "delta": delta, "weight_decay": weight_decay}
        super().__init__([group], defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by a LoRA-Pro optimizer over the same pairs (same order and scales)."""
        saved = [group.get("scales") for group in state_dict["param_groups"]]
        current = [group["scales"] for group in self.param_groups]
        if saved != current:
            raise ConfigError(f"the saved LoRA-Pro state has scales {saved}, this optimizer's pairs have {current}")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LoRA-Pro step for every pair with a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            for A, B, scale in zip(params[0::2], params[1::2], group["scales"], strict=True):
                if A.grad is not None or B.grad is not None:
                    self._step_pair(A, B, scale, group)
        return loss

    def _step_pair(self, A: torch.Tensor, B: torch.Tensor, scale: float, group: dict) -> None:
        rank, delta, lr = A.shape[0], group["delta"], group["lr"]
        A2, B2 = A.reshape(rank, -1), B.reshape(-1, rank)  # (r, n), (m, r)
        gA, gB = _grad_or_zeros(A).reshape(rank, -1), _grad_or_zeros(B).reshape(-1, rank)
        direction = _adam_direction(self.state[A], equivalent_gradient(A2, B2, gA, gB, scale, delta), group)
        full_gA, full_gB = (B2.T @ direction).mul_(scale), (direction @ A2.T).mul_(scale)  # (r, n), (m, r)
        hat_A, hat_B = adjusted_gradients(A2, B2, full_gA, full_gB, scale, delta)
        if group["weight_decay"]:
            A.mul_(1 - lr * group["weight_decay"])
            B.mul_(1 - lr * group["weight_decay"])
        A.add_(hat_A.reshape(A.shape), alpha=-lr)
        B.add_(hat_B.reshape(B.shape), alpha=-lr)


def _adam_direction(state: dict, full: torch.Tensor, group: dict) -> torch.Tensor:
    """Update the moments with ``full`` (m x n) and return ``m̂ / (√v̂ + eps)``, reusing ``full``'s memory."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(full)
        state["exp_avg_sq"] = torch.zeros_like(full)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(full, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(full, full, value=1 - beta2)
    denominator = torch.div(exp_avg_sq, 1 - beta2 ** state["step"], out=full).sqrt_().add_(group["eps"])
    return torch.div(exp_avg, denominator, out=denominator).div_(1 - beta1 ** state["step"])


def _grad_or_zeros(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)


def _full_shape(A: torch.Tensor, B: torch.Tensor) -> torch.Size:
    """``(m, n)`` of the update ``B2 @ A2``."""
    rank = A.shape[0]
    return torch.Size((B.numel() // rank, A.numel() // rank))


def _checked_pairs(pairs: Sequence[LoraFactors]) -> list[LoraFactors]:
    """``pairs`` as a list, or a ConfigError naming the first pair that is not a usable, distinct LoraFactors."""
    if isinstance(pairs, LoraFactors) or not isinstance(pairs, Sequence) or not pairs:
        raise ConfigError(f"pairs={pairs!r} is invalid: a non-empty sequence of LoraFactors is required")
    seen: set[int] = set()
    for index, pair in enumerate(pairs):
        if not isinstance(pair, LoraFactors):
            raise ConfigError(f"pairs[{index}] is a {type(pair).__name__}: LoraFactors (see lora_factors()) required")
        A, B = pair.A, pair.B
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.ndim >= 2 and B.ndim >= 2
                and B.shape[1] == A.shape[0]):
            raise ConfigError(f"pairs[{index}] ({pair.module}): A and B must be tensors, A (r, ...) and B (m, r, ...)")
        if isinstance(pair.scale, bool) or not isinstance(pair.scale, (int, float)) or not math.isfinite(pair.scale) \
                or pair.scale == 0:
            raise ConfigError(f"pairs[{index}] ({pair.module}): scale={pair.scale!r} must be a finite non-zero number")
        for parameter in (A, B):
            if id(parameter) in seen:
                raise ConfigError(f"pairs[{index}] ({pair.module}): a parameter appears twice in pairs")
            seen.add(id(parameter))
    return list(pairs)


def _checked_hyperparameters(lr: float, betas: tuple[float, float], eps: float, delta: float,
                             weight_decay: float) -> tuple[float, float]:
    """Raise ConfigError for a bad value; return ``betas`` as a tuple."""
    for name, value in (("lr", lr), ("eps", eps), ("delta", delta), ("weight_decay", weight_decay)):
        if not _is_number_at_least_zero(value):
            raise ConfigError(f"{name}={value!r} is invalid: a finite number >= 0 is required")
    if not (isinstance(betas, Sequence) and len(betas) == 2
            and all(_is_number_at_least_zero(beta) and beta < 1 for beta in betas)):
        raise ConfigError(f"betas={betas!r} is invalid: two numbers in [0, 1) are required")
    return (float(betas[0]), float(betas[1]))


def _is_number_at_least_zero(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0)
