"""What a training method adds to the loop, as four hooks around each optimizer step.

The loop calls, per step: ``before_step(step, total)``, then for each micro-batch
``loss(batch, outputs)`` (an extra term, averaged over the step's micro-batches and added to the task
loss), then, after the optimizer step, ``after_step(step, total)``; once the last step is done,
``finish()``. Hooks must be pure functions of the step and the model, so a resumed run behaves
exactly like an uninterrupted one without extra checkpoint state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.models.supervised_loss import SupervisedLogits


class TrainingExtension:
    """A no-op base: subclasses override the hooks they need."""

    def before_step(self, step: int, total: int) -> None:
        """Called before step ``step`` (0-based, of ``total``) computes any loss."""

    def loss(self, batch: dict[str, torch.Tensor], outputs: SupervisedLogits) -> torch.Tensor | None:
        """An extra loss for one micro-batch given the trained model's logits at its supervised positions
        (:class:`lorakit.models.supervised_loss.SupervisedLogits`), or None."""
        return None

    def after_step(self, step: int, total: int) -> None:
        """Called after step ``step``'s optimizer update."""

    def finish(self) -> None:
        """Called once after the last step, before the final evaluation and the save."""
