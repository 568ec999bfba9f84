"""The ``(A, B, scale)`` triples of one adapter across a model, for optimizers that treat them as pairs.

Every layer kind's update is ``s B A`` in the flattened layout ``B2 @ A2`` with ``A2 = A.reshape(r, -1)``
(r x d_in) and ``B2 = B.reshape(-1, r)`` (d_out x r), so pair-wise optimizers work on those 2-D views.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.errors import AdapterError


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module's factors: ``delta = scale * B2 @ A2`` (see the module docstring)."""

    module: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def lora_factors(model: nn.Module, adapter: str = "default") -> list[LoraFactors]:
    """Every module's factors of ``adapter``, in module order; raises if the model holds none."""
    from lorakit.core.layer import LoraLayer
    found = [LoraFactors(name, layer.adapters[adapter].A, layer.adapters[adapter].B, layer.adapters[adapter].scale)
             for name, layer in model.named_modules() if isinstance(layer, LoraLayer) and adapter in layer.adapters]
    if not found:
        raise AdapterError(f"the model holds no adapter {adapter!r}")
    return found
