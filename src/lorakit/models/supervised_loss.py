"""The causal language-modelling loss, summed over supervised tokens, from only the logits it needs.

``L = sum_t CE(logits_t, y_{t+1})`` over positions whose next-token label is not ``-100``; callers
divide by the token count of the whole optimizer step, so gradient accumulation weighs every token
alike however the tokens fall into micro-batches.

Only the M supervised positions' logits enter the loss, so they are the only ones computed where the
model allows it: a causal LM of a family in :data:`HEAD_ON_LAST_HIDDEN` computes ``logits =
head(body(x))`` with nothing in between, so lorakit runs the body, keeps the M positions' hidden
states and applies the output head to those rows alone. The numbers are the same as selecting from
the full ``(B, T, V)`` logits (a test); the head's FLOPs and the logits' memory shrink by ``M / BT``
(with masked prompts most positions carry no loss; SmolLM2's head is a fifth of its forward FLOPs).
Any other model (mixture wrappers, soft-capped or scaled heads) computes the full logits and selects.
With a frozen linear head the M positions' logits are not materialised either: the head and the
cross-entropy run fused, a block of rows at a time (:mod:`lorakit.models.head_loss`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lorakit.core.activation import mixed_batch
from lorakit.core.layer import LoraLayer
from lorakit.core.records import Records, recording
from lorakit.data.encoding import IGNORE_INDEX
from lorakit.models.head_loss import fusable_head, head_token_losses, loss_dtype

HEAD_ON_LAST_HIDDEN = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"})
"""Model families whose ``*ForCausalLM`` computes ``logits = get_output_embeddings()(base_model(...)[0])``."""


class SupervisedLogits:
    """The M positions whose next token carries a loss: their targets, batch rows, and their logits
    ``(M, V)``, computed on first use from the hidden states and the head when those are what the forward
    kept (then :func:`token_losses` can skip the logits altogether, :mod:`lorakit.models.head_loss`);
    ``records``: what the forward recorded for the losses (:mod:`lorakit.core.records`, e.g. router logits)."""

    def __init__(self, targets: torch.Tensor, rows: torch.Tensor, batch_size: int, *,
                 logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 head: nn.Module | None = None, records: Records | None = None) -> None:
        self.targets, self.rows, self.batch_size = targets, rows, batch_size
        self.hidden, self.head, self._logits = hidden, head, logits
        self.records: Records = records if records is not None else {}

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits

    @property
    def has_logits(self) -> bool:
        """Whether the logits exist already (given by the forward, or asked for before)."""
        return self._logits is not None

    @property
    def device(self) -> torch.device:
        return self.targets.device


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many next-token targets in ``batch`` carry a loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many real (non-padding) tokens ``batch`` holds."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """``input_ids`` and either an ``attention_mask`` (padded rows) or ``position_ids`` (packed rows), on
    the model's device, without a KV cache (a training or scoring forward never reuses one)."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return {**inputs, "use_cache": False}


def _body_and_head(model: nn.Module, per_row: bool) -> tuple[nn.Module, nn.Module] | None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in HEAD_ON_LAST_HIDDEN or isinstance(model, FSDPModule):
        return None  # FSDP gathers the root's weights (embeddings, head) in the root's own forward only
    head, body = model.get_output_embeddings(), getattr(model, "base_model", model)
    if head is None or body is model or (per_row and isinstance(head, LoraLayer)):
        return None  # a per-row adapter on the head needs the batch's rows: the full path keeps them
    return body, head


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: at position ``t`` the label of token ``t + 1`` (what position ``t``'s logits predict), and
    ``IGNORE_INDEX`` at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def supervised_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> SupervisedLogits:
    """The supervised positions' logits of ``batch`` (keys as :func:`_model_inputs`; ``adapter_per_row``
    routes each row to its own adapter), computed at those positions only where the model allows."""
    inputs = _model_inputs(model, batch)
    targets = next_token_labels(batch["labels"].to(inputs["input_ids"].device))
    return outputs_at_targets(model, inputs, targets, batch.get("adapter_per_row"))


def outputs_at_targets(model: nn.Module, inputs: dict, targets: torch.Tensor,
                       per_row: list[str] | None = None) -> SupervisedLogits:
    """The forward of ``model`` on ``inputs`` (on its device), kept at the positions whose ``targets`` ``(B, T)``
    (one per input position, :func:`next_token_labels`) are not ``IGNORE_INDEX``."""
    mask = targets != IGNORE_INDEX
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(mask)[mask]
    split = _body_and_head(model, per_row is not None)
    if split is None:
        if per_row is not None:
            inputs = {**inputs, "adapter_per_row": per_row}
        with recording() as records:
            logits = model(**inputs).logits[mask]
        return SupervisedLogits(targets[mask], rows, targets.shape[0], logits=logits, records=records)
    body, head = split
    with recording() as records, mixed_batch(model, per_row) if per_row is not None else contextlib.nullcontext():
        hidden = body(**inputs)[0]
    return SupervisedLogits(targets[mask], rows, targets.shape[0], hidden=hidden[mask], head=head, records=records)


def token_losses(outputs: SupervisedLogits) -> torch.Tensor:
    """Each supervised token's next-token cross-entropy, ``(M,)`` in fp32 (fp64 for an fp64 model): fused with a
    frozen linear head (:mod:`lorakit.models.head_loss`) unless the logits were already asked for."""
    if not outputs.has_logits and outputs.hidden is not None and fusable_head(outputs.head):
        return head_token_losses(outputs.hidden, outputs.head, outputs.targets)
    logits = outputs.logits
    return F.cross_entropy(logits.to(loss_dtype(logits.dtype)), outputs.targets, reduction="none")


def logits_loss(outputs: SupervisedLogits) -> torch.Tensor:
    """The summed next-token cross-entropy of the supervised positions."""
    return token_losses(outputs).sum()


def row_losses(outputs: SupervisedLogits) -> torch.Tensor:
    """Each batch row's summed next-token cross-entropy, ``(B,)``."""
    tokens = token_losses(outputs)
    return torch.zeros(outputs.batch_size, device=tokens.device, dtype=tokens.dtype).index_add(0, outputs.rows, tokens)


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed next-token cross-entropy of ``batch`` (see :func:`supervised_outputs`)."""
    return logits_loss(supervised_outputs(model, batch))


def adapter_token_counts(batches: list[dict]) -> dict[str, int]:
    """How many supervised next-token targets each adapter's rows hold over ``batches`` (one step)."""
    counts: dict[str, int] = {}
    for batch in batches:
        per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for name, tokens in zip(batch["adapter_per_row"], per_row, strict=True):
            counts[name] = counts.get(name, 0) + tokens
    return counts


def per_adapter_loss(outputs: SupervisedLogits, batch: dict, counts: dict[str, int]) -> torch.Tensor:
    """``sum_j (loss of adapter j's rows) / (adapter j's supervised tokens in the step)``: each adapter's own
    mean loss, so its gradient is the one it would get trained alone on its rows."""
    losses = row_losses(outputs)
    weights = torch.tensor([1.0 / max(1, counts[name]) for name in batch["adapter_per_row"]], device=losses.device)
    return (losses * weights).sum()
