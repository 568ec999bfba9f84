"""BA-LoRA's three regularisers against the frozen original model (Chang, Chang, Wu 2024).

"BA-LoRA: Bias-Alleviating Low-Rank Adaptation", arXiv 2408.04556; released code cyp-jlu-ai/BA-LoRA
``train.py`` (``CustomTrainer.compute_loss``, ``svd_regularization``). A frozen copy of the *original*
pre-trained model runs on the same batch and gives logits ``P``; the trained model gives ``F``::

    L = L_task + lambda1 * L_cons + lambda2 * L_div + lambda3 * L_svd

with defaults ``lambda1 = 1e-4``, ``lambda2 = 3e-4``, ``lambda3 = 1e-4`` and ``k = 3``. Every term is
differentiable in ``F``; ``P`` is detached. Inputs are cast to float32 and softmaxes are taken in log space.

NLU (``F``, ``P``: N x C classifier logits):

- ``L_cons = MSE(F / ||F||_row, P / ||P||_row)``, the mean over elements;
- ``L_div = sum_{i != j} Cov(F)_ij^2 / C`` with ``Cov = (F - mean F)^T (F - mean F) / (N - 1)``
  (decorrelates the logit dimensions). The covariance of one row is undefined: we return 0 for N = 1.

NLG (``F``, ``P``: M x V, the token logits at the M supervised positions of a batch of N sequences):

- ``L_cons = KL(softmax P || softmax F)`` summed over tokens and vocabulary and divided by N (the code's
  ``kl_div(..., reduction="batchmean")`` on N x T x V logits);
- ``L_div = -mean_tokens H(softmax F)`` (maximises the entropy).

Both (``svd_concentration``): ``L_svd = -(sum_{i<=k} sigma_i) / (sum_i sigma_i)`` of ``F`` (maximises the
top-k spectral mass). Deviations from the released code, all documented choices:

- The code computes the singular values under ``torch.no_grad()``, so its ``L_svd`` has no gradient; we
  keep the paper's intent and differentiate it (``torch.linalg.svdvals``).
- The code indexes ``s[:, :k]`` on the 1-D spectrum of a 2-D matrix, which raises; we take the paper's
  ratio on the 1-D spectrum.
- For NLG the paper reshapes the logits to N x (T*V) and the code averages the entropy over every
  position, padding and prompt included; we use the supervised positions' M x V matrix for all three
  terms, which is cheaper and ignores padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import Tensor

from lorakit.errors import ConfigError

TASKS = ("nlg", "nlu")
TERMS = ("consistency", "diversity", "svd", "total")


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ConfigError(f"{name} has shape {tuple(logits.shape)}: a 2-D (rows x classes) tensor with at least "
                          "one row and one column is required")


def _check_pair(trained: Tensor, original: Tensor) -> None:
    _check_logits("F", trained)
    _check_logits("P", original)
    if trained.shape != original.shape:
        raise ConfigError(f"F {tuple(trained.shape)} and P {tuple(original.shape)} are invalid: the same shape "
                          "is required")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: a positive integer is required")
    return value


def nlu_consistency(trained: Tensor, original: Tensor) -> Tensor:
    """``MSE(F/||F||_row, P/||P||_row)``, the mean over the N x C elements; ``P`` is detached."""
    _check_pair(trained, original)
    trained_directions = functional.normalize(trained.float(), dim=-1)
    original_directions = functional.normalize(original.detach().float(), dim=-1)
    return functional.mse_loss(trained_directions, original_directions)


def nlu_diversity(trained: Tensor) -> Tensor:
    """``sum_{i != j} Cov(F)_ij^2 / C`` over the N x C logits; 0 for a single row (no covariance)."""
    _check_logits("F", trained)
    rows, classes = trained.shape
    if rows == 1:
        return trained.new_zeros((), dtype=torch.float32)
    centred = trained.float() - trained.float().mean(dim=0)
    covariance = centred.T @ centred / (rows - 1)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return off_diagonal.pow(2).sum() / classes


def nlg_consistency(trained: Tensor, original: Tensor, rows: int) -> Tensor:
    """``KL(softmax P || softmax F)`` summed over the M x V token logits, divided by the N sequences."""
    _check_pair(trained, original)
    sequences = _positive_int("rows", rows)
    trained_log_probs = functional.log_softmax(trained.float(), dim=-1)
    original_log_probs = functional.log_softmax(original.detach().float(), dim=-1)
    divergence = functional.kl_div(trained_log_probs, original_log_probs, reduction="sum", log_target=True)
    return divergence / sequences


def nlg_diversity(trained: Tensor) -> Tensor:
    """Minus the mean over the M tokens of the entropy of ``softmax F`` (V classes)."""
    _check_logits("F", trained)
    log_probs = functional.log_softmax(trained.float(), dim=-1)
    entropies = -(log_probs.exp() * log_probs).sum(dim=-1)
    return -entropies.mean()


def svd_concentration(trained: Tensor, k: int) -> Tensor:
    """``-(sum of the k largest singular values) / (sum of all)`` of ``F``; -1 when rank(F) <= k."""
    _check_logits("F", trained)
    top_k = _positive_int("k", k)
    singular_values = torch.linalg.svdvals(trained.float())          # descending
    total = singular_values.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return -singular_values[:top_k].sum() / total


@dataclass(frozen=True)
class BaLoraWeights:
    """BA-LoRA's weights: lambda1 (consistency), lambda2 (diversity), lambda3 (svd) and k (top_k)."""

    consistency: float = 1e-4
    diversity: float = 3e-4
    svd: float = 1e-4
    top_k: int = 3

    def __post_init__(self) -> None:
        for name in ("consistency", "diversity", "svd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid: a non-negative finite number is required")
        _positive_int("top_k", self.top_k)


def _weighted(weight: float, compute_term: Callable[[], Tensor], device: torch.device) -> Tensor:
    """``weight * term``, without computing the term (an SVD, a softmax) when the weight is 0."""
    if weight == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    return weight * compute_term()


def ba_lora_terms(trained: Tensor, original: Tensor, *, task: str = "nlg", rows: int | None = None,
                  weights: BaLoraWeights = BaLoraWeights()) -> dict[str, Tensor]:
    """The weighted ``"consistency"``, ``"diversity"`` and ``"svd"`` terms and their sum ``"total"``.

    ``trained`` (F) and ``original`` (P) are N x C logits for ``task="nlu"``, or for ``task="nlg"`` the M x V
    token logits at the supervised positions of a batch of ``rows`` sequences (``rows`` is required for
    NLG and unused for NLU). Add ``terms["total"]`` to the task loss. With no rows at all (a micro-batch
    without supervised tokens) every term is 0.
    """
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is invalid: one of {', '.join(TASKS)}")
    if task == "nlg" and rows is None:
        raise ConfigError("rows=None is invalid for task='nlg': the number of sequences N is required")
    device = trained.device
    if trained.dim() == 2 and trained.shape == original.shape and trained.shape[0] == 0:
        return {name: torch.zeros((), dtype=torch.float32, device=device) for name in TERMS}
    _check_pair(trained, original)
    if task == "nlg":
        consistency = _weighted(weights.consistency, lambda: nlg_consistency(trained, original, rows), device)
        diversity = _weighted(weights.diversity, lambda: nlg_diversity(trained), device)
    else:
        consistency = _weighted(weights.consistency, lambda: nlu_consistency(trained, original), device)
        diversity = _weighted(weights.diversity, lambda: nlu_diversity(trained), device)
    svd = _weighted(weights.svd, lambda: svd_concentration(trained, weights.top_k), device)
    return {"consistency": consistency, "diversity": diversity, "svd": svd,
            "total": consistency + diversity + svd}
