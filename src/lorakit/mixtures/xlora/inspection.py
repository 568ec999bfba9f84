"""What an X-LoRA classifier does: which expert it weights, in which module, on which token.

* :func:`mean_scalings` — ``mean[l, n] = sum_t sigma[t, l, n] / T`` over the T real (non-padding)
  tokens of a dataset (the full prompt + completion text, as in training): layers x experts.
* :func:`token_scalings` — one prompt's scalings per token, ``sigma[t, :, n]`` averaged over the L
  adapted modules: tokens x experts (and the full ``(S, L, N)`` tensor).
* :func:`inspect_xlora` — both, as two heatmap PNGs and a JSON file (``lorakit xlora inspect``).

The scalings are those the real pass applies: the classifier's output, or with ``top_k`` its k
largest per token (renormalised with ``enable_softmax_topk``) and zeros elsewhere; pass
``applied=False`` for the classifier's dense output. ``global_scaling_weight`` is not folded in.
Everything runs under ``no_grad`` with the model in eval mode (restored afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.modes import eval_mode
from lorakit.data.batching import collate
from lorakit.data.encoding import encode, pad_id, prompt_ids
from lorakit.data.example import Example
from lorakit.errors import DataError
from lorakit.io.files import save_json
from lorakit.mixtures.xlora.classifier import keep_top_k
from lorakit.mixtures.xlora.model import XLoraModel

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

LAYERS_PLOT = "layers_by_experts.png"
TOKENS_PLOT = "tokens_by_experts.png"
SCALINGS_JSON = "scalings.json"
DIGITS = 6
"""Decimals kept in JSON output."""


@dataclass(frozen=True)
class ScalingSummary:
    """The mean scaling of each expert in each adapted module over the real tokens of a dataset."""

    layer_names: list[str]
    """The L adapted modules, in slot order (rows of ``mean``)."""
    experts: list[str]
    """The N experts (columns of ``mean``)."""
    mean: torch.Tensor
    """``(L, N)`` float32 on the CPU; each row sums to 1 with softmax (and no top-k)."""
    tokens: int
    """How many real (non-padding) tokens were averaged."""


@dataclass(frozen=True)
class TokenScalings:
    """One prompt's scalings, token by token."""

    tokens: list[str]
    """Each token id decoded on its own (special tokens kept)."""
    ids: list[int]
    """The prompt's token ids, as the model sees them at generation time."""
    layer_names: list[str]
    experts: list[str]
    per_token: torch.Tensor
    """``(S, N)``: the scalings averaged over the L adapted modules."""
    full: torch.Tensor
    """``(S, L, N)``: every module's scalings."""


@torch.no_grad()
def mean_scalings(xmodel: XLoraModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
                  batch_size: int = 8, chat: bool | None = None, max_length: int | None = 256,
                  applied: bool = True) -> ScalingSummary:
    """The mean scaling per (adapted module, expert) over every real token of ``examples``.

    Examples are encoded as for training (prompt + completion, truncated to ``max_length``), batched
    by length with right padding, and padding positions are masked out of the mean.
    """
    if not examples:
        raise DataError("mean_scalings needs at least one example")
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    encoded = sorted((encode(e, tokenizer, chat=chat, max_length=max_length) for e in examples), key=len)
    pad = pad_id(tokenizer)
    device = _device(xmodel)
    total = torch.zeros(xmodel.n_layers, len(xmodel.experts), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(xmodel):
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            sigma = _scalings(xmodel, ids, mask, applied)  # (B, S, L, N)
            total += (sigma.double() * mask[:, :, None, None]).sum(dim=(0, 1))
            count += int(mask.sum())
    return ScalingSummary(list(xmodel.layer_names), list(xmodel.experts), (total / count).float().cpu(), count)


@torch.no_grad()
def token_scalings(xmodel: XLoraModel, tokenizer: PreTrainedTokenizerBase, prompt: str | Example, *,
                   chat: bool | None = None, applied: bool = True) -> TokenScalings:
    """The scalings of each token of ``prompt`` (rendered with the chat template when ``chat``)."""
    ids = prompt_ids(tokenizer, prompt, chat)
    if not ids:
        raise DataError(f"the prompt {prompt!r} has no tokens")
    device = _device(xmodel)
    input_ids = torch.tensor([ids], device=device)
    with eval_mode(xmodel):
        full = _scalings(xmodel, input_ids, torch.ones_like(input_ids), applied)[0].float().cpu()  # (S, L, N)
    tokens = [tokenizer.decode([token], skip_special_tokens=False) for token in ids]
    return TokenScalings(tokens, ids, list(xmodel.layer_names), list(xmodel.experts), full.mean(dim=1), full)


def to_json(result: ScalingSummary | TokenScalings, *, include_layers: bool = False) -> dict[str, Any]:
    """A JSON-ready dict of names, counts and lists of floats (``DIGITS`` decimals).

    For :class:`TokenScalings`, ``include_layers`` adds the full ``(S, L, N)`` tensor as ``"full"``.
    """
    if isinstance(result, ScalingSummary):
        return {"layer_names": result.layer_names, "experts": result.experts, "tokens": result.tokens,
                "mean": _floats(result.mean)}
    if isinstance(result, TokenScalings):
        out = {"tokens": result.tokens, "ids": result.ids, "layer_names": result.layer_names,
               "experts": result.experts, "per_token": _floats(result.per_token)}
        if include_layers:
            out["full"] = _floats(result.full)
        return out
    raise TypeError(f"to_json takes a ScalingSummary or TokenScalings, got {type(result).__name__}")


def inspect_xlora(xmodel: XLoraModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                  prompt: str | Example, out_dir: str | Path, *, chat: bool | None = None, batch_size: int = 8,
                  max_length: int | None = 256) -> dict[str, Any]:
    """Write ``layers_by_experts.png``, ``tokens_by_experts.png`` and ``scalings.json`` to ``out_dir``.

    Returns the JSON object written: ``{"mean_scalings": ..., "token_scalings": ..., "plots": [...]}``.
    Needs matplotlib (``pip install matplotlib``); it is checked before the model runs.
    """
    from lorakit.analysis.plots import heatmap, matplotlib_classes

    matplotlib_classes()  # fail fast, before minutes of forward passes, when matplotlib is missing
    out = Path(out_dir)
    summary = mean_scalings(xmodel, tokenizer, examples, batch_size=batch_size, chat=chat, max_length=max_length)
    per_token = token_scalings(xmodel, tokenizer, prompt, chat=chat)
    heatmap(summary.mean, summary.layer_names, summary.experts, path=out / LAYERS_PLOT,
            title=f"X-LoRA: mean scaling per adapted module\n({summary.tokens} tokens, "
                  f"{len(examples)} examples)",
            colorbar_label="mean scaling", row_title="adapted module (layer.module)", col_title="expert")
    heatmap(per_token.per_token, [repr(token) for token in per_token.tokens], per_token.experts,
            path=out / TOKENS_PLOT, title=f"X-LoRA: scaling per prompt token\n(mean over "
                                          f"{len(per_token.layer_names)} adapted modules)",
            colorbar_label="scaling (mean over modules)", row_title="prompt token", col_title="expert")
    report = {"mean_scalings": to_json(summary), "token_scalings": to_json(per_token),
              "plots": [LAYERS_PLOT, TOKENS_PLOT]}
    save_json(out / SCALINGS_JSON, report)
    return report


def _scalings(xmodel: XLoraModel, input_ids: torch.Tensor, mask: torch.Tensor, applied: bool) -> torch.Tensor:
    """The scalings ``(B, S, L, N)`` of one forward: the classifier's, or those the real pass applies."""
    sigma = xmodel(input_ids, attention_mask=mask).scalings
    top_k = xmodel.config.top_k
    if not applied or top_k is None:
        return sigma
    indices, values = keep_top_k(sigma, min(top_k, len(xmodel.experts)), xmodel.config.enable_softmax_topk)
    return torch.zeros_like(sigma).scatter(-1, indices, values)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _floats(tensor: torch.Tensor) -> list:
    return torch.round(tensor.double(), decimals=DIGITS).tolist()
