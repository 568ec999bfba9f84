"""Several adapters trained in one batch (as in mLoRA): one frozen base, rows of every batch belonging
to different adapters.

Each row runs with its own adapter (the stacked per-row path, :mod:`lorakit.core.per_row`), each
adapter's loss is its own rows' mean over the step (:func:`lorakit.models.supervised_loss.per_adapter_loss`), and
each adapter's gradient is clipped on its own. So every adapter receives exactly the gradient, and
(AdamW being per-parameter) the update, it would get if trained alone on its rows of the same
batches; the base's forward and backward are shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.config import TrainConfig
from lorakit.core.lifecycle import adapter_names
from lorakit.data.encoding import Encoded
from lorakit.data.example import Example
from lorakit.errors import ConfigError
from lorakit.io.adapters import save_adapter
from lorakit.methods.component import TrainingComponent
from lorakit.train.loop import TrainResult, train


def check_multi_config(config: TrainConfig) -> None:
    """Refuse the settings joint training does not support, with the reason."""
    if config.pack:
        raise ConfigError("pack=True would put rows of different adapters into one packed row; "
                          "train several adapters without packing")
    if config.full or (config.optimizer, config.method, config.regularizer) != ("adamw", "lora", None):
        raise ConfigError("several adapters in one batch train with plain LoRA and AdamW; full fine-tuning, "
                          "other optimizers, methods and regularizers act on one adapter")


class JointAdapters(TrainingComponent):
    """Tags every example with the adapter it trains (``row_adapters[i]`` for example ``i``) and saves each
    adapter to ``out_dir/<name>``; the loop then gives each adapter its own loss and clipping."""

    def __init__(self, row_adapters: Sequence[str]) -> None:
        self.row_adapters = list(row_adapters)
        self.names = list(dict.fromkeys(self.row_adapters))

    def attach(self, model: nn.Module) -> None:
        missing = [name for name in self.names if name not in adapter_names(model)]
        if not self.names or missing:
            raise ConfigError(f"attach an adapter for every dataset first: {missing or 'no datasets given'} "
                              f"(the model holds {adapter_names(model)})")

    def batches(self, encoded: Sequence[Encoded]) -> list[Encoded]:
        if len(encoded) != len(self.row_adapters):
            raise ConfigError(f"{len(self.row_adapters)} adapter names for {len(encoded)} examples")
        return [dataclasses.replace(e, adapter=name) for e, name in zip(encoded, self.row_adapters, strict=True)]

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> bool:
        for name in self.names:
            save_adapter(model, out_dir / name, name)
        return True


def train_adapters(model: nn.Module, tokenizer, datasets: Mapping[str, Sequence[Example]],
                   config: TrainConfig = TrainConfig(), *, out_dir: str | Path | None = None,
                   resume: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the adapters already attached under ``datasets``' names, each on its own examples, in shared
    batches; adapter ``name`` is written to ``out_dir/name`` (PEFT format) when the run completes."""
    check_multi_config(config)
    examples = [example for name in datasets for example in datasets[name]]
    joint = JointAdapters([name for name in datasets for _ in datasets[name]])
    return train(model, tokenizer, examples, config, components=[joint], out_dir=out_dir, resume=resume,
                 overwrite=overwrite, progress=progress)
