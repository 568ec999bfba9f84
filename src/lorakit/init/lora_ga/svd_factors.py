"""Step 2 of LoRA-GA, for one weight: the initial factors ``(A0, B0)`` from the SVD of its gradient.

With ``G ~= U S V^T`` (top ``2r`` components), one LoRA step from ``(A0, B0)`` moves the weight by
``-eta s^2 (B0 B0^T G + G A0^T A0)``; taking ``A0`` and ``B0`` from *disjoint* singular vectors of ``G``
makes this step approximate the full fine-tuning step ``-eta G`` as well as a rank-2r update can
(Wang, Yu, Li 2024, "LoRA-GA", arXiv 2407.05000, Sec. 3, "gradient approximation"). ``direction`` says
which components go where:

* ``"ArB2r"`` (default): ``A0 = V[:, :r]^T``, ``B0 = U[:, r:2r]``;
* ``"A2rBr"``: ``A0 = V[:, r:2r]^T``, ``B0 = U[:, :r]``;
* ``"ArBr"``: ``A0`` from the odd components ``1, 3, ...``, ``B0`` from the even ones ``0, 2, ...``;
* ``"random"``: a random disjoint split of the ``2r`` components (``generator`` decides).

``scale`` then sets their size. Two conventions exist; lorakit implements both:

* ``"official"`` (default; Outsider565/LoRA-GA ``lora_ga_init``): ``A0`` and ``B0`` keep orthonormal
  rows/columns and are scaled alike. ``"stable"`` multiplies both by ``m^(1/4) / sqrt(gamma)``
  (``m = d_out``), the paper's "stable scale" (Sec. 3, "scale stability"; its recipe trains it with
  rsLoRA); ``"gd"`` divides both by ``s``; ``"unit"`` leaves them; ``"weightS"`` multiplies both by
  ``mean(sqrt(sigma_i(W) / s))`` over the top ``r`` singular values of the base weight ``W``.
* ``"peft"`` (huggingface/peft ``lora_ga_init``): ``B0 = U[:, idx_B] diag(S[idx_B])``, and ``"stable"``
  scales ``B0`` only; ``"gd"`` divides both by ``s``; ``"unit"`` leaves them; ``"weight_svd"``
  multiplies ``B0`` by ``sigma_1(W) / S_B[0]``.

The official convention is the default because it is the one the paper analyses and reports: its
init has a size set by ``m``, ``gamma`` and ``s`` alone. PEFT's puts the gradient's singular values
into ``B0``, so the size of the init (and of the weight offset) follows the size of the gradient,
which changes with the loss, the data and the number of tokens per batch.

The SVD is ``torch.svd_lowrank(G, q=min(4r, m, n), niter=4)`` in fp32, as both references do, under a
fixed seed so that every run and every rank gets the same factors. It is exact when ``rank(G) <= q``
and otherwise a close approximation of the top ``2r`` components, at ``O(m n r)`` cost where a full
SVD costs ``O(m n min(m, n))`` (minutes per layer on a CPU for 7B-sized weights).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.errors import ConfigError


@torch.no_grad()
def top_components(grad: torch.Tensor, count: int, rank: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``U (m, count)``, ``S (count,)``, ``V (n, count)`` of ``grad`` from the seeded randomized SVD."""
    m, n = grad.shape
    devices = [grad.device] if grad.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(grad.float(), q=min(4 * rank, m, n), niter=4)
    return U[:, :count], S[:count], V[:, :count]


# Which of the top 2r components A0 and B0 take: (r, generator) -> (indices for A0, indices for B0).
SPLITS: dict[str, Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]] = {
    "ArB2r": lambda r, generator: (torch.arange(r), torch.arange(r, 2 * r)),
    "A2rBr": lambda r, generator: (torch.arange(r, 2 * r), torch.arange(r)),
    "ArBr": lambda r, generator: (torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)),
    "random": lambda r, generator: torch.randperm(2 * r, generator=generator).split(r),
}


# A scale rule maps (A0, B0, S_B, context) to the scaled pair; S_B are the singular values of B0's
# components, the context holds m = d_out, s, gamma, the base weight W, r and the seed.
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


def _stable_both(A, B, S_B, c):
    factor = c["m"] ** 0.25 / c["gamma"] ** 0.5
    return A * factor, B * factor


def _stable_b(A, B, S_B, c):
    return A, B * (c["m"] ** 0.25 / c["gamma"] ** 0.5)


def _gd(A, B, S_B, c):
    return A / c["s"], B / c["s"]


def _unit(A, B, S_B, c):
    return A, B


def _weight_s(A, B, S_B, c):
    sigma = top_components(c["weight"], c["rank"], c["rank"], c["seed"])[1]
    factor = torch.sqrt(sigma / c["s"]).mean()
    return A * factor, B * factor


def _weight_svd(A, B, S_B, c):
    if S_B[0] <= 0:  # a zero gradient: nothing to match the weight's scale to
        return A, B
    sigma = top_components(c["weight"], c["rank"], c["rank"], c["seed"])[1]
    return A, B * (sigma[0] / S_B[0])


SCALES: dict[str, dict[str, Rule]] = {
    "official": {"stable": _stable_both, "gd": _gd, "unit": _unit, "weightS": _weight_s},
    "peft": {"stable": _stable_b, "gd": _gd, "unit": _unit, "weight_svd": _weight_svd},
}


def check_options(direction: str, scale: str, convention: str, stable_gamma: float) -> None:
    """Refuse unknown option values, naming the known ones."""
    if direction not in SPLITS:
        raise ConfigError(f"direction={direction!r} is invalid: one of {', '.join(SPLITS)}")
    if convention not in SCALES:
        raise ConfigError(f"convention={convention!r} is invalid: one of {', '.join(SCALES)}")
    if scale not in SCALES[convention]:
        raise ConfigError(f"scale={scale!r} is invalid with convention={convention!r}: one of "
                          f"{', '.join(SCALES[convention])}")
    if isinstance(stable_gamma, bool) or not isinstance(stable_gamma, (int, float)) or not stable_gamma > 0:
        raise ConfigError(f"stable_gamma={stable_gamma!r} is invalid: a positive number is required")


def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, rank: int, s: float, *, direction: str = "ArB2r",
                    scale: str = "stable", stable_gamma: float = 16, convention: str = "official", seed: int = 0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A0 (r, n)`` and ``B0 (m, r)`` in fp32 for gradient ``grad (m, n)`` and LoRA scale ``s``; see the module
    docstring. ``weight`` is the base weight, in any layout: only ``"weightS"`` and ``"weight_svd"`` use it,
    for its singular values. ``generator`` draws the ``"random"`` split (default: seeded by ``seed``)."""
    check_options(direction, scale, convention, stable_gamma)
    m, n = grad.shape
    if 2 * rank > min(m, n):
        raise ConfigError(f"rank={rank} is too large for LoRA-GA on a ({m}, {n}) weight: A0 and B0 take "
                          f"2 * rank = {2 * rank} distinct singular vectors, at most {min(m, n)} exist")
    U, S, V = top_components(grad, 2 * rank, rank, seed)  # (m, 2r), (2r,), (n, 2r)
    index_a, index_b = SPLITS[direction](rank, generator or torch.Generator().manual_seed(seed))
    index_a, index_b = index_a.to(U.device), index_b.to(U.device)
    A, B, S_B = V[:, index_a].T, U[:, index_b], S[index_b]  # (r, n), (m, r), (r,)
    if convention == "peft":
        B = B * S_B
    context = {"m": m, "s": s, "gamma": stable_gamma, "weight": weight, "rank": rank, "seed": seed}
    A, B = SCALES[convention][scale](A, B, S_B, context)
    return A.contiguous(), B.contiguous()
