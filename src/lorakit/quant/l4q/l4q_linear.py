"""L4Q's training layer (Jeon, Kim, Kim, ACL'25, arXiv 2402.04902): LoRA merged into the weight, then
fake-quantized with a learned step and offset per group, all in one forward::

    W'  = W0 + s B A                                          W0 (out, in) frozen, A (r, in), B (out, r)
    W_q = Delta * (clamp(round(W' / Delta - z), Qn, Qp) + z)  Delta, z (out, G) learned
    y   = x W_q^T + bias

``L4QLinear(layer, name)`` is built from a :class:`~lorakit.core.layer.LoraLayer` on an ``nn.Linear``: it keeps
the layer's base as ``base_layer`` and adapter ``name`` under ``adapters[name]`` (the same ``A``, ``B``
Parameters and scale, so parameter names and optimizer state carry over), and adds the Parameters ``step``
(``Delta``) and ``offset`` (``z``), initialised from each group's min and max of ``W0`` (with ``B = 0`` the layer
starts as the round-to-nearest quantization of ``W0``). The adapter's dropout does not apply, and neither does
lorakit's routing (``disabled``, ``set_active``): its update lives inside the quantized weight, not on a side
path. :meth:`L4QLinear.finalize` gives the frozen
:class:`~lorakit.quant.l4q.uniform_linear.UniformQuantizedLinear` that computes the same outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.layer import LoraLayer
from lorakit.errors import StateError, TargetError
from lorakit.quant.l4q.autograd import l4q_matmul
from lorakit.quant.l4q.config import L4QConfig
from lorakit.quant.l4q.fake_quant import codes_, merged_rows, minmax_init, row_tiles, ungrouped
from lorakit.quant.l4q.uniform_linear import UniformQuantizedLinear


class L4QLinear(nn.Module):
    """``y = x W_q^T + bias`` with ``W_q`` the fake-quantized ``W0 + s B A``; see the module docstring."""

    def __init__(self, layer: LoraLayer, name: str = "default", config: L4QConfig | None = None,
                 module_name: str = "") -> None:
        super().__init__()
        config = config or L4QConfig()
        where = f"module {module_name or type(layer.base_layer).__name__!r}"
        base = layer.base_layer
        if not (isinstance(base, nn.Linear) and base.weight.is_floating_point()):
            raise TargetError(f"{where} adapts a {type(base).__name__}; L4Q quantizes nn.Linear layers only")
        if name not in layer.adapters or len(layer.adapters) != 1 or layer.merged:
            raise StateError(f"{where} holds adapters {sorted(layer.adapters)} (merged: {sorted(layer.merged)}); "
                             f"L4Q folds exactly one unmerged adapter, {name!r}, into the quantized weight")
        self.base_layer = base.requires_grad_(False)
        self.adapters = nn.ModuleDict({name: layer.adapters[name]})
        self.name, self.config = name, config
        adapter = layer.adapters[name]
        step, offset = minmax_init(base.weight, config)
        trainable = adapter.A.requires_grad
        self.step = nn.Parameter(step.to(adapter.A.device), requires_grad=trainable)
        self.offset = nn.Parameter(offset.to(adapter.A.device), requires_grad=trainable)
        self.train(layer.training)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, scale = self.adapters[self.name].factors()  # the quantizer runs in A's dtype, the product in x's
        return l4q_matmul(x, self.base_layer.weight, A, B, self.step, self.offset, self.base_layer.bias, scale,
                          self.config)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """``W_q`` (out, in) float32, as the forward computes it."""
        return self.finalize().dequantize()

    @torch.no_grad()
    def finalize(self) -> UniformQuantizedLinear:
        """The frozen layer holding ``codes = clamp(round((W0 + s B A) / Delta - z), Qn, Qp)`` (uint8), ``Delta``,
        ``z`` and the bias: it computes this layer's forward. A non-finite or zero step is refused."""
        A, B, scale = self.adapters[self.name].factors()
        weight = self.base_layer.weight
        step, offset = self.step.detach(), self.offset.detach()
        if not (torch.isfinite(step).all() and torch.isfinite(offset).all() and (step != 0).all()):
            raise StateError(f"L4Q layer ({self.out_features} x {self.in_features}): its step or offset is not "
                             "finite, or a step is zero; training diverged, nothing can be finalized")
        tiles = [ungrouped(codes_(merged_rows(weight, A, B, scale, rows, self.config.group_size), step[rows],
                                  offset[rows], self.config), self.in_features)
                 for rows in row_tiles(self.out_features, self.in_features, self.config.tile_elements)]
        codes = (tiles[0] if len(tiles) == 1 else torch.cat(tiles)).to(torch.uint8)  # (out, in), exact integers
        return UniformQuantizedLinear(codes, step, offset, self.base_layer.bias, self.config).train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.config.bits}, "
                f"group_size={self.config.group_size}, adapter={self.name!r}")
