"""MixLoRA as a training component: the objective ``CE_LM + c * L_aux`` (:mod:`.aux_loss`) from the router
logits the forward recorded, and the run's result saved as a MixLoRA directory (:func:`.storage.save_mixlora`).

The model must already be a MixLoRA model (:func:`.attach.attach_mixlora`, which ``lorakit train --method
mixlora`` calls with the LoRA flags' rank, alpha and dropout): the component refuses a plain model rather
than train it without its experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, StateError
from lorakit.methods.component import TrainingComponent
from lorakit.mixtures.mixlora.attach import mixlora_layers
from lorakit.mixtures.mixlora.aux_loss import load_balancing_loss
from lorakit.mixtures.mixlora.ffn import ROUTER_LOGITS
from lorakit.mixtures.mixlora.storage import save_mixlora

AUX_LOSS = "mixlora_aux"
"""The name of the load-balancing term among a step's extra losses."""


class MixLoraTraining(TrainingComponent):
    """``c * L_aux`` per micro-batch (``c``: ``coefficient``, default the model's MixLoRA config), and the save."""

    def __init__(self, coefficient: float | None = None) -> None:
        self.coefficient = coefficient
        self.top_k = 0
        self.layers = 0

    def attach(self, model: nn.Module) -> None:
        try:
            layers = mixlora_layers(model)
        except StateError:
            raise ConfigError("method='mixlora' trains a MixLoRA model, and this model has no MixLoRA FFN: "
                              "call lorakit.mixtures.mixlora.attach_mixlora(model, MixLoraConfig(...)) first") from None
        config = layers[0][1].config
        self.coefficient = config.aux_loss_coefficient if self.coefficient is None else self.coefficient
        self.top_k, self.layers = config.top_k, len(layers)

    def losses(self, batch: dict[str, Any], outputs) -> Mapping[str, torch.Tensor]:
        recorded = outputs.records.get(ROUTER_LOGITS, [])
        if len(recorded) != self.layers:
            raise StateError(f"the forward recorded router logits of {len(recorded)} MixLoRA FFNs, not of the "
                             f"model's {self.layers}: the load-balancing loss needs every layer's")
        mask = batch.get("attention_mask")
        if mask is not None:
            mask = mask.to(recorded[0].device)
        return {AUX_LOSS: self.coefficient * load_balancing_loss(recorded, self.top_k, mask)}

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        save_mixlora(model, out_dir)
        return True
