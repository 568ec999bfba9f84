"""What ``lorakit analyze`` looks at: the weight updates of an adapter, or of a whole checkpoint.

* A PEFT-format adapter directory (``adapter_config.json``): each Linear/Conv1D module's
  ``ΔW = s B A`` (low rank, from the factors). Embedding and Conv2d modules are listed as skipped.
* A model directory (a full fine-tune, any Hugging Face causal LM with safetensors): each linear
  layer of ``"all-linear"`` (the output head excluded) whose weight differs from the base's, as the
  dense ``ΔW = W_t - W_0``.

Updates are laid out like ``nn.Linear.weight`` (d_out x d_in); a GPT-2 ``Conv1D``'s (in, out) weight is
transposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.analysis.deltas import Delta, DenseDelta, LowRankDelta
from lorakit.config import LoraConfig
from lorakit.core.inject import find_targets
from lorakit.core.kinds import Conv1DKind, kind_of
from lorakit.errors import ConfigError
from lorakit.io.adapters import CONFIG_FILE
from lorakit.io.factors import AdapterFactors, read_adapter_factors
from lorakit.models import load_model


@dataclass(frozen=True)
class Subject:
    """The updates of one adapter or checkpoint, by module (in model order)."""

    path: str
    kind: str  # "adapter" or "weights"
    deltas: dict[str, Delta]
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it was not analysed
    factors: AdapterFactors | None = None


def base_weight(model: nn.Module, module: str) -> torch.Tensor:
    """The weight of linear layer ``module`` of ``model`` as (d_out, d_in)."""
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise ConfigError(f"the base model has no module {module!r}; was the adapter trained on another base?") \
            from None
    weight = layer.weight.detach()
    return weight.T if isinstance(kind_of(layer, module), Conv1DKind) else weight


def load_subject(path: str | Path, base_model: nn.Module) -> Subject:
    """The adapter or model directory at ``path`` as per-module updates against ``base_model``."""
    directory = Path(path)
    if (directory / CONFIG_FILE).is_file():
        return _adapter_subject(directory, base_model)
    if (directory / "config.json").is_file():
        return _weights_subject(directory, base_model)
    raise ConfigError(f"{path} is neither an adapter directory ({CONFIG_FILE}) nor a model directory "
                      "(config.json + safetensors)")


def _adapter_subject(directory: Path, base_model: nn.Module) -> Subject:
    factors = read_adapter_factors(directory)
    position = {name: index for index, (name, _) in enumerate(base_model.named_modules())}
    deltas, skipped = {}, {}
    for module, pair in sorted(factors.modules.items(), key=lambda item: position.get(item[0], len(position))):
        if not pair.is_linear:
            skipped[module] = "not a linear layer (intruders are defined for weight matrices)"
            continue
        expected = tuple(base_weight(base_model, module).shape)
        delta = LowRankDelta(pair.scale * pair.B, pair.A)
        if delta.shape != expected:
            raise ConfigError(f"{directory}: module {module!r} updates a {delta.shape} weight, the base's is "
                              f"{expected}; was the adapter trained on another base?")
        deltas[module] = delta
    return Subject(str(directory), "adapter", deltas, skipped, factors)


def _weights_subject(directory: Path, base_model: nn.Module) -> Subject:
    tuned, _ = load_model(directory)
    deltas, skipped = {}, {}
    for module in find_targets(base_model, LoraConfig(targets="all-linear")):
        before = base_weight(base_model, module)
        after = base_weight(tuned, module)
        if after.shape != before.shape:
            raise ConfigError(f"{directory}: {module!r} is {tuple(after.shape)}, the base's is "
                              f"{tuple(before.shape)}; the checkpoint does not fine-tune this base")
        if torch.equal(after, before):
            skipped[module] = "unchanged"
            continue
        deltas[module] = DenseDelta(after.double() - before.double())
    return Subject(str(directory), "weights", deltas, skipped)
