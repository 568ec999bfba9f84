"""BA-LoRA's regularisers inside the training loop (Chang, Chang, Wu 2024, arXiv 2408.04556).

Each micro-batch adds ``l1 L_cons + l2 L_div + l3 L_svd`` (:mod:`lorakit.regularizers.ba_lora`) computed
on the logits of the supervised positions, against the logits ``P`` of the frozen *original* model on
the same batch. ``reference`` says which model that is:

* ``"disabled"``: the trained model itself with its adapters disabled: exact when the adapter was attached
  to the unmodified base (kaiming, gaussian, EVA inits), and no second copy of the weights in memory;
* ``"snapshot"``: a frozen copy of the whole model taken when the run attaches (before the first step),
  for runs whose base weights move: full fine-tuning, or LoRA-GA's offset (there the copy holds the
  offset base and the initial adapter, whose sum is the original model up to rounding);
* ``"auto"`` (the default): ``"snapshot"`` for full fine-tuning, else ``"disabled"``;
* or any ``nn.Module`` (e.g. a separately loaded original model), used as it is, frozen.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.core.activation import disabled
from lorakit.core.modes import eval_mode
from lorakit.errors import ConfigError
from lorakit.methods.component import TrainingComponent
from lorakit.models.supervised_loss import SupervisedLogits, supervised_outputs
from lorakit.regularizers.ba_lora import BaLoraWeights, ba_lora_terms

REFERENCES = ("auto", "disabled", "snapshot")


class BaLoraRegularizer(TrainingComponent):
    """The BA-LoRA loss terms for causal-LM training (the paper's NLG form)."""

    def __init__(self, weights: BaLoraWeights = BaLoraWeights(), *, reference: str | nn.Module = "auto",
                 full: bool = False) -> None:
        if not isinstance(reference, nn.Module) and reference not in REFERENCES:
            raise ConfigError(f"ba_lora_reference={reference!r} is invalid: one of {', '.join(REFERENCES)}")
        if reference == "auto":
            reference = "snapshot" if full else "disabled"
        self.weights, self.mode = weights, reference
        self.model: nn.Module | None = None
        self.reference: nn.Module | None = reference if isinstance(reference, nn.Module) else None

    def attach(self, model: nn.Module) -> None:
        self.model = model
        if self.mode == "snapshot":
            self.reference = copy.deepcopy(model)
        if self.reference is not None:
            self.reference.requires_grad_(False)

    def reference_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The original model's (M, V) logits at ``batch``'s supervised positions, without gradient and
        without dropout."""
        with torch.no_grad():
            if self.reference is not None:
                with eval_mode(self.reference):
                    return supervised_outputs(self.reference, batch).logits
            with disabled(self.model), eval_mode(self.model):
                return supervised_outputs(self.model, batch).logits

    def losses(self, batch: dict[str, torch.Tensor], outputs: SupervisedLogits) -> dict[str, torch.Tensor]:
        original = self.reference_logits(batch).to(outputs.logits.device)
        return {"ba_lora": ba_lora_terms(outputs.logits, original, task="nlg", rows=outputs.batch_size,
                                         weights=self.weights)["total"]}
