"""PAT as a training method: the run's LoRA adapter and PAT's hybrid sparsification modules trained together, the
result one narrower model (Liu et al., "PAT: Pruning-Aware Tuning for Large Language Models", AAAI'25,
arXiv 2408.14721).

``PatTraining`` attaches the modules when the run starts (again on resume, before the checkpoint restores them:
they are trainable parameters, so checkpoints hold them by name), tells the shared mask the step before each one
(the schedule is a function of the step alone, so a resumed run needs no state of its own), adds the
mask-count and identity losses to every micro-batch, and at the end merges the adapter, cuts the masked channels
and writes the narrow model (:mod:`lorakit.pruning.pat_removal`) in place of the adapter.

The mask's raw values ``mu`` train at their own peak rate ``mask_lr`` (default 1e-2; None: the run's): Adam moves
each about that much a step, and the mask only decides once ``mu`` nears +-0.5. The paper trains everything at
5e-5 for about 10^4 steps; at the few hundred steps of a CPU run the run's rate leaves ``mu`` near 0, the soft mask
near 0.5 everywhere, and the hard mask at the freeze point an abrupt cut (measured: docs/results/pruning.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError, StateError
from lorakit.methods.component import TrainingComponent
from lorakit.pruning.pat_model import PatModules, attach_pat, check_pat_options
from lorakit.pruning.pat_removal import remove_pat_channels, save_pat_model

if TYPE_CHECKING:
    from lorakit.config import TrainConfig
    from lorakit.models.supervised_loss import SupervisedLogits

MASK_LR = 1e-2
"""The mask's default peak learning rate (module docstring)."""


class PatTraining(TrainingComponent):
    """PAT keeping ``keep`` of the hidden channels, HSMs of operator ``rank``, the mask hard from ``freeze`` of the
    run on, the identity loss with ``identity_loss``."""

    def __init__(self, *, keep: float = 0.75, rank: int = 16, freeze: float = 0.8, identity_loss: bool = True,
                 mask_lr: float | None = MASK_LR) -> None:
        check_pat_options(keep, rank, freeze)
        if not isinstance(identity_loss, bool):
            raise ConfigError(f"pat_identity_loss is {identity_loss!r}; true or false is required")
        if mask_lr is not None and (isinstance(mask_lr, bool) or not isinstance(mask_lr, (int, float))
                                    or not 0 < mask_lr < float("inf")):
            raise ConfigError(f"pat_mask_lr is {mask_lr!r}; a positive number (or none: the run's lr) is required")
        self.keep, self.rank, self.freeze, self.identity_loss = keep, rank, freeze, identity_loss
        self.mask_lr = mask_lr
        self.pat: PatModules | None = None

    def attach(self, model: nn.Module) -> None:
        self.pat = attach_pat(model, keep=self.keep, rank=self.rank, freeze=self.freeze)

    def _attached(self) -> PatModules:
        if self.pat is None:
            raise StateError("PatTraining is not attached to a model; the trainer calls attach(model) first")
        return self.pat

    def optimizer(self, model: nn.Module, parameters: list[nn.Parameter],
                  config: TrainConfig) -> torch.optim.Optimizer | None:
        """AdamW with the mask ``mu`` in a group of its own: peak rate ``mask_lr`` (``lr_scale`` = mask_lr / lr, on
        the run's schedule), no weight decay."""
        if self.mask_lr is None or config.optimizer != "adamw":
            return None
        raw = self._attached().mask.raw
        rest = [p for p in parameters if p is not raw]
        return torch.optim.AdamW([{"params": rest}, {"params": [raw], "lr_scale": self.mask_lr / config.lr,
                                                     "weight_decay": 0.0}],
                                 lr=config.lr, weight_decay=config.weight_decay)

    def before_step(self, step: int, total: int) -> None:
        self._attached().mask.set_step(step, total)

    def losses(self, batch: dict[str, Any], outputs: SupervisedLogits) -> Mapping[str, torch.Tensor]:
        return self._attached().loss_terms(identity=self.identity_loss)

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        """Cut the trained model to its kept channels and write it (``model`` is left merged, PAT attached)."""
        narrow, cut = remove_pat_channels(model)
        save_pat_model(narrow, tokenizer, out_dir, cut)
        return True
