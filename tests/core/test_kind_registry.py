"""Layer kinds come from a registry that packages above core extend (quantized layers, new families)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.core import kinds
from lorakit.core.inject import plan
from lorakit.core.kinds import EmbeddingKind, LinearKind, kind_of, known_kinds, register_kind
from tests.helpers import perturb


class Doubling(nn.Module):
    """A base layer no built-in kind knows: ``y = 2 W x`` with ``W`` stored (out, in)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.linear(x, self.weight)


class DoublingKind(LinearKind):
    """LoRA on :class:`Doubling`: the same A and B shapes as a linear layer."""

    name = "Doubling"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = Doubling(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


class QuantLinear(nn.Linear):
    """Stands in for a quantized linear layer, which subclasses ``nn.Linear``."""


class QuantKind(LinearKind):
    name = "QuantLinear"


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))  # what a test registers ends with it


def test_an_unsupported_type_is_named_with_the_known_kinds():
    with pytest.raises(lorakit.TargetError) as info:
        kind_of(Doubling(6, 5), "proj")
    message = str(info.value)
    assert "'proj' has type Doubling" in message
    assert ("supported types: nn.Linear, Conv1D (transformers), nn.Embedding, nn.Conv2d, Linear4bit (bitsandbytes), "
            "Linear8bitLt (bitsandbytes), NFLinear (lorakit.quant)") in message


@pytest.mark.parametrize("by", ["type", "qualified name"])
def test_a_kind_registered_from_outside_core_is_picked_up(by):
    register_kind(Doubling if by == "type" else f"{__name__}.Doubling", DoublingKind, label="Doubling (tests)")
    assert known_kinds()[-1] == "Doubling (tests)"
    net = Net()
    x = torch.randn(4, 6)
    config = LoraConfig(rank=2, alpha=4, targets="all-linear")
    assert [target.name for target in plan(net, config)] == ["proj", "head"]  # DoublingKind is a linear kind
    lorakit.attach(net, config)
    assert isinstance(net.proj.kind, DoublingKind) and type(net.head.kind) is LinearKind
    perturb(net, "default")
    adapter = net.proj.adapters["default"]
    with torch.no_grad():
        expected = net.proj.base_layer(x) + 2.0 * x @ adapter.A.T @ adapter.B.T
        torch.testing.assert_close(net.proj(x), expected, atol=1e-6, rtol=1e-6)


def test_the_most_specific_registered_type_wins():
    quant = QuantLinear(4, 3)
    assert type(kind_of(quant, "q")) is LinearKind  # a subclass of nn.Linear is a Linear until it registers
    register_kind(QuantLinear, QuantKind)
    assert type(kind_of(quant, "q")) is QuantKind
    assert type(kind_of(nn.Linear(4, 3), "l")) is LinearKind
    assert known_kinds()[-1] == "QuantLinear"  # the default label is the class name


def test_a_second_kind_for_a_registered_type_is_refused():
    register_kind(nn.Linear, LinearKind)  # the same kind again changes nothing
    with pytest.raises(lorakit.ConfigError, match="already has the layer kind LinearKind; cannot register"):
        register_kind(nn.Linear, EmbeddingKind)
    assert type(kind_of(nn.Linear(4, 3), "l")) is LinearKind
