"""L4Q as a training method: quantization-aware LoRA whose result is one fully quantized model.

``L4QTraining`` turns the run's adapter into :class:`~lorakit.quant.l4q.l4q_linear.L4QLinear` layers when the
run starts (again on resume, before the checkpoint restores ``A``, ``B``, step and offset: they are
trainable parameters, so checkpoints hold them by name), gives AdamW's weight decay to ``A`` and ``B`` only
(decaying a step towards zero would shrink the grid), and at the end finalizes every layer to integer codes
and saves the ``l4q-model`` directory (Jeon, Kim, Kim, ACL'25, arXiv 2402.04902).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.component import TrainingComponent
from lorakit.quant.l4q.l4q_model import attach_l4q, finalize_l4q, l4q_layers
from lorakit.quant.l4q.model_dir import save_l4q_model

if TYPE_CHECKING:
    from lorakit.config import TrainConfig


class L4QTraining(TrainingComponent):
    """Attach L4Q to adapter ``name`` at the start; finalize and save the quantized model at the end."""

    def __init__(self, *, bits: int = 4, group_size: int = 128, lsq_grad_scale: bool = False,
                 name: str = "default") -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(f"l4q_bits is {bits!r}; an integer from 2 to 8 is required")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"l4q_group_size is {group_size!r}; a positive integer is required")
        if not isinstance(lsq_grad_scale, bool):
            raise ConfigError(f"l4q_lsq_grad_scale is {lsq_grad_scale!r}; true or false is required")
        self.bits, self.group_size, self.lsq_grad_scale, self.name = bits, group_size, lsq_grad_scale, name

    def attach(self, model: nn.Module) -> None:
        attach_l4q(model, self.name, self.bits, self.group_size, lsq_grad_scale=self.lsq_grad_scale)

    def optimizer(self, model: nn.Module, parameters: list[nn.Parameter],
                  config: TrainConfig) -> torch.optim.Optimizer | None:
        if config.optimizer != "adamw" or config.weight_decay == 0:
            return None  # the trainer's own AdamW (or the chosen optimizer) is what L4Q needs
        quantizer = {id(p) for layer in l4q_layers(model).values() for p in (layer.step, layer.offset)}
        groups = [{"params": [p for p in parameters if id(p) not in quantizer]},
                  {"params": [p for p in parameters if id(p) in quantizer], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay)

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        """Finalize the model in place (every L4QLinear becomes a UniformQuantizedLinear) and save it."""
        finalize_l4q(model)
        save_l4q_model(model, tokenizer, out_dir)
        return True
