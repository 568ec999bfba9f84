"""BA-LoRA's regularisers inside the training loop (Chang, Chang, Wu 2024, arXiv 2408.04556).

Each micro-batch adds ``l1 L_cons + l2 L_div + l3 L_svd`` (:mod:`lorakit.regularizers.ba_lora`) computed
on the logits of the supervised positions, against the logits ``P`` of the frozen *original* model on
the same batch. That model is, by default, the trained model itself with its adapters disabled: exact
when the adapter was attached to the unmodified base (kaiming, gaussian, EVA inits) and no second copy
of the weights in memory. Runs whose base weights moved (LoRA-GA's offset, full fine-tuning) must pass
a separately loaded copy as ``reference``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.activation import disabled
from lorakit.core.modes import eval_mode
from lorakit.regularizers.ba_lora import BaLoraWeights, ba_lora_terms
from lorakit.methods.component import TrainingExtension
from lorakit.models.supervised_loss import SupervisedLogits, supervised_outputs


class BaLoraRegularizer(TrainingExtension):
    """The BA-LoRA loss terms for causal-LM training (the paper's NLG form)."""

    def __init__(self, model: nn.Module, weights: BaLoraWeights = BaLoraWeights(), *,
                 reference: nn.Module | None = None) -> None:
        self.model, self.weights, self.reference = model, weights, reference
        if reference is not None:
            reference.requires_grad_(False)

    def reference_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The original model's (M, V) logits at ``batch``'s supervised positions, without gradient and
        without dropout."""
        with torch.no_grad():
            if self.reference is not None:
                with eval_mode(self.reference):
                    return supervised_outputs(self.reference, batch).logits
            with disabled(self.model), eval_mode(self.model):
                return supervised_outputs(self.model, batch).logits

    def loss(self, batch: dict[str, torch.Tensor], outputs: SupervisedLogits) -> torch.Tensor:
        original = self.reference_logits(batch).to(outputs.logits.device)
        return ba_lora_terms(outputs.logits, original, task="nlg", rows=outputs.batch_size,
                             weights=self.weights)["total"]
