"""MeteoRA's gate supervision: every token of a task-labelled row should route to that task's adapter.

    CE_gate = mean over (gated layer, labelled token) of  -log softmax(z_layer(token))[task(row)]

one cross-entropy over all layers' gate logits concatenated (as the released code does), padding
(``attention_mask == 0``) and rows without a task left out; the training objective is
``CE_LM + lambda * CE_gate`` (mixtures.md §3.2). Layers that do not hold a row's adapter are left out
for that row's tokens (their gate cannot pick it).

No t -> t+1 shift. The released code scores the gate logits at position t against the label at t+1,
an artefact of reusing the LM-label shift. Here a row's gate label is constant (its task), so the
shift would only drop each row's last real token and, in packed rows, mislabel the token before a
boundary; the gate at position t reads token t's own input, so we score it against token t's task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lorakit.errors import AdapterError, DataError, StateError
from lorakit.methods.component import TrainingComponent
from lorakit.mixtures.meteora.model import MeteoraModel

IGNORE = -100


def task_targets(tasks: Sequence[str | None], task_index: Mapping[str, int]) -> list[int]:
    """Each row's adapter index (``IGNORE`` for ``None``); a :class:`DataError` names unknown tasks."""
    unknown = sorted({t for t in tasks if t is not None and t not in task_index})
    if unknown:
        raise DataError(f"tasks {unknown} map to no MeteoRA adapter; known tasks: {sorted(task_index)}")
    return [IGNORE if t is None else task_index[t] for t in tasks]


def gate_task_loss(gate_logits: Sequence[torch.Tensor], targets: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean gate cross-entropy. ``gate_logits``: per layer ``(B, T, N)`` (``-inf`` for adapters a layer
    lacks); ``targets``: ``(B,)`` adapter index per row or ``IGNORE``; ``mask``: ``(B, T)``, 0 = padding.
    Zero (no gradient) when no token is labelled."""
    device = gate_logits[0].device
    targets = targets.to(device)
    pieces, labels = [], []
    for logits in gate_logits:
        rows, n = logits.shape[0], logits.shape[-1]
        if rows != targets.shape[0]:
            raise DataError(f"gate logits for {rows} rows but {targets.shape[0]} task labels")
        flat = logits.reshape(rows, -1, n)
        token_targets = targets[:, None].expand(rows, flat.shape[1]).clone()
        if mask is not None:
            if tuple(mask.shape) != tuple(flat.shape[:2]):
                raise DataError(f"attention mask {tuple(mask.shape)} does not match gate logits "
                                f"{tuple(flat.shape[:2])}")
            token_targets[mask.to(device) == 0] = IGNORE
        labelled = token_targets != IGNORE
        # a layer that lacks the row's adapter (logit -inf) cannot be asked to pick it
        reachable = torch.isfinite(flat.gather(-1, token_targets.clamp_min(0)[..., None]).squeeze(-1))
        token_targets[labelled & ~reachable] = IGNORE
        pieces.append(flat.reshape(-1, n))
        labels.append(token_targets.reshape(-1))
    logits, labels = torch.cat(pieces), torch.cat(labels)
    keep = (labels != IGNORE).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return torch.zeros((), device=device)
    return nn.functional.cross_entropy(logits.index_select(0, keep).float(), labels.index_select(0, keep))


class MeteoraTaskLoss(TrainingComponent):
    """The training loop's ``lambda * CE_gate`` term (named ``meteora_task``) from the gate logits the
    forward of ``model`` recorded in its outputs. ``batch["task_per_row"]`` names each row's task (or None);
    ``task_to_adapter`` maps task names to adapter names (default: each adapter's own name)."""

    def __init__(self, model: MeteoraModel, task_to_adapter: Mapping[str, str] | None = None,
                 weight: float | None = None) -> None:
        self.model = model
        mapping = dict(task_to_adapter) if task_to_adapter is not None else {n: n for n in model.names}
        unknown = sorted({a for a in mapping.values() if a not in model.names})
        if unknown:
            raise AdapterError(f"task_to_adapter names adapters {unknown} that MeteoRA does not mix: "
                               f"{list(model.names)}")
        self.task_index = {task: model.names.index(adapter) for task, adapter in mapping.items()}
        self.weight = model.config.task_loss_weight if weight is None else float(weight)

    def losses(self, batch: dict, outputs) -> dict[str, torch.Tensor]:
        tasks = batch.get("task_per_row")
        if tasks is None or all(t is None for t in tasks):
            return {}  # no row names its task: no term
        recorded = list(self.model.gate_logits(outputs.records).values())
        if not recorded:
            raise StateError("the forward recorded no MeteoRA gate logits: train the MeteoraModel itself")
        targets = torch.tensor(task_targets(list(tasks), self.task_index), dtype=torch.long)
        return {"meteora_task": self.weight * gate_task_loss(recorded, targets, batch.get("attention_mask"))}
