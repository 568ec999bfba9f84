"""L4Q's quantizer and its custom autograd function: min-max init, the straight-through backward against autograd
through a reference implementation, and what the forward keeps for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.quant.l4q import L4QConfig, attach_l4q, l4q_layers, l4q_matmul, minmax_init


def reference_l4q(x, W0, A, B, step, offset, bias, scale, config: L4QConfig):
    """``x W_q^T + bias`` written out with autograd: straight-through round, clamp's own gradient, LSQ's scale."""
    g, width = config.group_size, W0.shape[1]
    if config.lsq_grad_scale:
        sizes = torch.tensor([min(g, width - j * g) for j in range(step.shape[1])], dtype=step.dtype)
        factor = (sizes * config.qmax).rsqrt()
        step = (step - step * factor).detach() + step * factor  # the value of step, the gradient times factor
        offset = (offset - offset * factor).detach() + offset * factor
    steps = step.repeat_interleave(g, dim=1)[:, :width]  # (out, in)
    offsets = offset.repeat_interleave(g, dim=1)[:, :width]
    u = (W0 + scale * B @ A) / steps - offsets
    rounded = u + (u.round() - u).detach()  # round forward, identity backward
    return F.linear(x, steps * (rounded.clamp(config.qmin, config.qmax) + offsets), bias)


CASES = [  # (in_features, group_size, tile_elements, lsq_grad_scale)
    (12, 4, 1 << 20, False),  # groups divide the width, one tile
    (10, 4, 20, False),  # a shorter last group, tiles of two rows
    (8, 8, 7, True),  # one group per row, one row per tile, LSQ's scale
    (10, 4, 1 << 20, True),
]


@pytest.mark.parametrize(("width", "group", "tile", "lsq"), CASES)
def test_the_custom_backward_equals_autograd_through_the_reference(width, group, tile, lsq):
    generator = torch.Generator().manual_seed(width + group)
    out, rank, scale = 6, 3, 0.7
    config = L4QConfig(bits=3, group_size=group, lsq_grad_scale=lsq, tile_elements=tile)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std

    W0 = randn(out, width)
    step, offset = minmax_init(W0, config)
    # A step shrunk and an offset moved push elements out of the grid at both ends.
    step = (step.double() * 0.8).requires_grad_()
    offset = (offset.double() + 0.3).requires_grad_()
    A, B = randn(rank, width).requires_grad_(), randn(out, rank, std=0.3).requires_grad_()
    x, bias, grad = randn(2, 5, width).requires_grad_(), randn(out), randn(2, 5, out)
    with torch.no_grad():
        steps = step.repeat_interleave(group, dim=1)[:, :width]
        u = (W0 + scale * B @ A) / steps - offset.repeat_interleave(group, dim=1)[:, :width]
    assert (u.round() < config.qmin).any() and (u.round() > config.qmax).any()  # clamped at both ends
    ours = l4q_matmul(x, W0, A, B, step, offset, bias, scale, config)
    theirs = reference_l4q(x, W0, A, B, step, offset, bias, scale, config)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    inputs = (x, A, B, step, offset)
    for name, mine, expected in zip(("x", "A", "B", "step", "offset"), torch.autograd.grad(ours, inputs, grad),
                                    torch.autograd.grad(theirs, inputs, grad), strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


class _Net(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def _l4q_net(weight: torch.Tensor, bits: int, group_size: int) -> _Net:
    net = _Net(weight)
    lorakit.attach(net, LoraConfig(rank=2, alpha=2, targets=("proj",)))  # A Kaiming, B = 0
    attach_l4q(net, bits=bits, group_size=group_size)
    return net


WEIGHT = torch.tensor([[0.0, 0.3, 0.9, -0.6],
                       [1.0, 2.2, 4.0, 0.0]])


def test_at_init_the_weight_is_min_max_round_to_nearest_of_w0():
    """2 bits (codes 0..3), one group per row. Row 0: min -0.6, max 0.9, step 0.5, (W - min) / step = 1.2, 1.8,
    3, 0 -> codes 1, 2, 3, 0 -> -0.1, 0.4, 0.9, -0.6. Row 1: step 4/3, W / step = 0.75, 1.65, 3, 0 -> codes
    1, 2, 3, 0 -> 4/3, 8/3, 4, 0."""
    layer = l4q_layers(_l4q_net(WEIGHT, bits=2, group_size=4))["proj"]
    torch.testing.assert_close(layer.step.detach(), torch.tensor([[0.5], [4 / 3]]))
    torch.testing.assert_close(layer.offset.detach(), torch.tensor([[-1.2], [0.0]]))
    expected = torch.tensor([[-0.1, 0.4, 0.9, -0.6], [4 / 3, 8 / 3, 4.0, 0.0]])
    torch.testing.assert_close(layer.quantized_weight(), expected)
    assert layer.finalize().codes.tolist() == [[1, 2, 3, 0], [1, 2, 3, 0]]
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x @ expected.T)


def test_a_shorter_last_group_and_a_constant_group_are_exact():
    """Group size 3: row 0's first group 0, 0.3, 0.9 sits on its grid (step 0.3); its last group is the single
    value -0.6, a constant group, which dequantizes to itself."""
    layer = l4q_layers(_l4q_net(WEIGHT, bits=2, group_size=3))["proj"]
    assert layer.step.shape == (2, 2)
    torch.testing.assert_close(layer.quantized_weight()[0], WEIGHT[0])
    torch.testing.assert_close(layer.quantized_weight()[1, 3:], WEIGHT[1, 3:])


def test_the_forward_keeps_nothing_weight_sized_but_w0_for_the_backward():
    torch.manual_seed(0)
    net = _l4q_net(torch.randn(24, 40), bits=4, group_size=16)
    layer = l4q_layers(net)["proj"]
    with torch.no_grad():
        layer.adapters["default"].B.normal_()
    W0 = layer.base_layer.weight
    x = torch.randn(3, 5, 40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    weight_sized = [s for s in saved if s[0] >= W0.numel()]
    assert weight_sized == [(W0.numel(), W0.untyped_storage().data_ptr(), (24, 40))]
    assert sorted(s[2] for s in saved) == sorted([(3, 5, 40), (24, 40), (2, 40), (24, 2), (24, 3), (24, 3)])
    y.square().sum().backward()
    assert all(p.grad is not None for p in (x, layer.step, layer.offset, layer.adapters["default"].A))
    assert W0.grad is None


@pytest.mark.parametrize(("field", "value"), [("bits", 1), ("bits", 9), ("group_size", 0), ("lsq_grad_scale", 1)])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"L4QConfig\.{field} is {value}"):
        L4QConfig(**{field: value})
