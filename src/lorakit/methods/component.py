"""The protocol every training method implements: hooks the generic trainer (:func:`lorakit.train.train`)
calls at fixed points of a run, so that a new method plugs in without editing the loop.

A run calls, in order::

    attach(model)                       once, before the optimizer exists: add or reshape parameters
    optimizer(model, parameters, cfg)   once: a component may supply the optimizer (default AdamW)
    load_state_dict(state)              once, when resuming: the state saved by state_dict()
    batches(encoded)                    once: choose or tag the examples the batches are drawn from
    per step:
        before_step(step, total)
        losses(batch, outputs)          per micro-batch: named extra loss terms from the model outputs
        step(optimizer)                 True: the component took the optimizer step itself
        after_step(step, total)
    state_dict()                        at every checkpoint
    finish()                            once, after the last step
    save(model, tokenizer, out_dir)     True: the component wrote the run's result itself

Hooks must be pure functions of the step, the model and the component's own ``state_dict``, so a
resumed run is the uninterrupted run. Every hook has a no-op default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit.config import TrainConfig
    from lorakit.data.encoding import Encoded
    from lorakit.models.supervised_loss import SupervisedLogits


class TrainingComponent:
    """A no-op base: subclasses override the hooks they need (see the module docstring for the order)."""

    def attach(self, model: nn.Module) -> None:
        """Change ``model`` before training starts (add adapters, gates, experts); runs again on resume."""

    def optimizer(self, model: nn.Module, parameters: list[nn.Parameter],
                  config: TrainConfig) -> torch.optim.Optimizer | None:
        """The optimizer of the run over ``parameters``, or None to leave the choice to another component."""
        return None

    def batches(self, encoded: Sequence[Encoded]) -> Sequence[Encoded]:
        """The examples the run's batches are drawn from (a subset, or the examples tagged with an adapter)."""
        return encoded

    def before_step(self, step: int, total: int) -> None:
        """Called before step ``step`` (0-based, of ``total``) computes any loss."""

    def losses(self, batch: dict[str, Any], outputs: SupervisedLogits) -> Mapping[str, torch.Tensor]:
        """Extra loss terms for one micro-batch, by name, from the trained model's outputs at its supervised
        positions (:class:`lorakit.models.supervised_loss.SupervisedLogits`, with what the forward recorded)."""
        return {}

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Take the optimizer step in place of the trainer and return True, or return False."""
        return False

    def after_step(self, step: int, total: int) -> None:
        """Called after step ``step``'s optimizer update."""

    def finish(self) -> None:
        """Called once after the last step, before the final evaluation and the save."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The component's own state for an exact resume (tensors; saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        """Write the run's result to ``out_dir`` and return True, or return False for the default save."""
        return False


class WritesResult(TrainingComponent):
    """Saves the run's result with ``write(out_dir)``: a job's own format (an X-LoRA or MeteoRA directory)."""

    def __init__(self, write: Callable[[Path], object]) -> None:
        self.write = write

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        self.write(out_dir)
        return True
