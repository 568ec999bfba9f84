"""What ``lorakit analyze`` looks at: the weight updates of an adapter, or of a whole checkpoint.

The directory's kind (:func:`lorakit.io.directory_kinds.directory_kind`, what :func:`lorakit.load` reads) says which:

* An adapter (kind ``adapter``: lorakit's, PEFT's, a LoRA-GA or DyLoRA export): each Linear/Conv1D module's
  ``ΔW = s B A`` (low rank, from the factors). Embedding and Conv2d modules are listed as skipped.
* A whole model (kind ``model``: a full fine-tune or a merge, any Hugging Face causal LM with safetensors):
  each linear layer of ``"all-linear"`` (the output head excluded) whose weight differs from the base's,
  as the dense ``ΔW = W_t - W_0``.
* A mixture (X-LoRA, MixLoRA, MeteoRA) has no fixed update: it is refused by kind, naming how it routes.

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
from lorakit.io.adapters import ADAPTER_KIND
from lorakit.io.directory_kinds import directory_kind
from lorakit.io.factors import AdapterFactors, read_adapter_factors
from lorakit.io.loader import load


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
    kind = directory_kind(directory)
    if kind.routed is not None:
        raise ConfigError(f"lorakit analyze cannot analyse the {kind.name} directory {path}: {kind.routed}, so it "
                          "makes no fixed weight update; analyse each of its adapters instead")
    if kind.whole_model:
        return _weights_subject(directory, base_model)
    if kind.name == ADAPTER_KIND:
        return _adapter_subject(directory, base_model)
    raise ConfigError(f"lorakit analyze reads adapters and whole models; {path} is {kind.holds} (kind {kind.name!r})")


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
    tuned = load(directory).model
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
