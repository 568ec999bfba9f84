"""LoRAM as a training component: the run trains on the pruned model and saves the recovered, full-size adapter.

The adapter of the pruned model is recovered (:func:`~lorakit.pruning.recovery.recover_tensors`) and written in
PEFT format for the full base, which it names, so that ``lorakit.load`` and ``peft`` put it on the unpruned model
(Zhang et al., ICLR'25, arXiv 2502.13533, step 4). Checkpoints keep the pruned adapter: a resumed run prunes the
base again from the run's ``loram.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.io.adapters import adapter_tensors, peft_config, write_adapter_files
from lorakit.io.base_quantization import adapter_quantization
from lorakit.methods.component import TrainingComponent
from lorakit.pruning.recovery import recover_tensors
from lorakit.pruning.structured import PruneMap

LORAM_FILE = "loram.json"
"""The prune map and parameter counts of a LoRAM run, in its directory."""


class LoramRecovery(TrainingComponent):
    """Save adapter ``name`` recovered to the full model's shapes under ``prune_map``."""

    def __init__(self, prune_map: PruneMap, *, recover: str = "zero", seed: int = 0, name: str = "default") -> None:
        self.prune_map, self.recover, self.seed, self.name = prune_map, recover, seed, name

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        tensors = recover_tensors(adapter_tensors(model, self.name), self.prune_map, recover=self.recover,
                                  seed=self.seed)
        write_adapter_files(out_dir, tensors, peft_config(model, self.name), origin="loram",
                            base_quantization=adapter_quantization(model, self.name))
        return True
