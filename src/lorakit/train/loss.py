"""The causal language-modelling loss, summed over supervised tokens.

``L = sum_t CE(logits_t, y_{t+1})`` over positions whose next-token label is not ``-100``; callers
divide by the token count of the whole optimizer step, so gradient accumulation weighs every token
alike however the tokens fall into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.encoding import IGNORE_INDEX


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many next-token targets in ``batch`` carry a loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many real (non-padding) tokens ``batch`` holds."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def batch_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (B, T, V) of ``batch``: ``input_ids`` and either an ``attention_mask`` (padded rows)
    or ``position_ids`` (packed rows, no cache)."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "position_ids" in inputs:
        inputs["use_cache"] = False
    if "adapter_per_row" in batch:  # several adapters trained in one batch
        inputs["adapter_per_row"] = batch["adapter_per_row"]
    return model(**inputs).logits


def supervised_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (M, V) logits of the M positions whose next token carries a loss."""
    mask = batch["labels"].to(logits.device)[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask]


def logits_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed next-token cross-entropy of ``logits`` (B, T, V) against ``batch["labels"]``."""
    targets = batch["labels"].to(logits.device)[:, 1:]
    shifted = logits[:, :-1]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def row_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed next-token cross-entropy, ``(B,)``."""
    targets = batch["labels"].to(logits.device)[:, 1:]
    shifted = logits[:, :-1]
    tokens = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return tokens.reshape(targets.shape).sum(dim=1)


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed next-token cross-entropy of ``batch`` (see :func:`batch_logits` for its keys)."""
    return logits_loss(batch_logits(model, batch), batch)


def adapter_token_counts(batches: list[dict]) -> dict[str, int]:
    """How many supervised next-token targets each adapter's rows hold over ``batches`` (one step)."""
    counts: dict[str, int] = {}
    for batch in batches:
        per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for name, tokens in zip(batch["adapter_per_row"], per_row):
            counts[name] = counts.get(name, 0) + tokens
    return counts


def per_adapter_loss(logits: torch.Tensor, batch: dict, counts: dict[str, int]) -> torch.Tensor:
    """``sum_j (loss of adapter j's rows) / (adapter j's supervised tokens in the step)``: each adapter's own
    mean loss, so its gradient is the one it would get trained alone on its rows."""
    weights = torch.tensor([1.0 / max(1, counts[name]) for name in batch["adapter_per_row"]], device=logits.device)
    return (row_losses(logits, batch) * weights).sum()
