"""A frozen linear layer with a blockwise NormalFloat weight, which LoRA adapts as QLoRA does.

``NFLinear`` (QLoRA: Dettmers et al. 2023) holds its weight ``W`` (out, in) as an :class:`NFTensor` and
computes ``y = x dequantize(W)^T + bias`` with the weight dequantized to the input's dtype on every
forward. Its kind (:class:`~lorakit.core.kinds.QuantizedLinearKind`) is a linear kind, so ``lorakit.attach`` adds
``s B A x`` beside it (``A`` (r, in), ``B`` (out, r)); merging into it in place is refused, since folding
``s B A`` into a quantized weight means dequantize, add, requantize (:mod:`lorakit.quant.requantize`).

The quantized parts are buffers held as raw bytes (uint8 views), so ``model.to(dtype)`` moves them
between devices but never casts the fp32 or fp16 scales: what is stored stays bit for bit the same.

In training, the forward keeps nothing full-size for the backward (:class:`DequantizingLinear`): the input's
gradient ``dL/dx = dL/dy W`` dequantizes ``W`` again, so a layer's dequantized weight lives only while its
forward or backward runs — QLoRA's memory saving (plain ``F.linear`` would save ``W`` until the backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.kinds import QuantizedLinearKind, register_kind
from lorakit.quant.nf_config import NFConfig
from lorakit.quant.quantized_tensor import OPTIONAL_PARTS, NFTensor, part_dtypes, quantize_nf


class DequantizingLinear(torch.autograd.Function):
    """``y = x W^T + bias`` for an :class:`NFLinear`, saving only the layer (its codes) for the backward, where
    ``dL/dx = dL/dy W`` with ``W`` dequantized again; the weight and bias are frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NFLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.linear(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.quantized.dequantize(grad.dtype), None  # (..., out) @ (out, in)


class NFLinear(nn.Module):
    """``y = x W^T + bias`` with ``W`` (out, in) stored as NormalFloat codes; nothing in it trains."""

    def __init__(self, quantized: NFTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = quantized.shape
        self.config = quantized.config
        for name, part in quantized.parts().items():
            self.register_buffer(name, part.reshape(-1).view(torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NFConfig) -> NFLinear:
        """``linear``'s weight quantized under ``config``, its bias kept as it is (on the same device)."""
        return cls(quantize_nf(linear.weight, config), linear.bias)

    @property
    def quantized(self) -> NFTensor:
        """The stored weight as an :class:`NFTensor` (views of the buffers, no copy)."""
        typed = {name: getattr(self, name).view(dtype) for name, dtype in part_dtypes(self.config).items()}
        optional = {name: typed.pop(name, None) for name in OPTIONAL_PARTS}
        return NFTensor(**typed, **optional, shape=(self.out_features, self.in_features), config=self.config)

    @property
    def quantization_scheme(self) -> str:
        """The name adapters trained on this layer record (:attr:`NFConfig.name`)."""
        return self.config.name

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), a new float32 tensor on every call (not a Parameter: writing
        into it changes nothing)."""
        return self.quantized.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return DequantizingLinear.apply(x, self)
        return self.linear(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + bias`` with the weight dequantized to ``x``'s dtype, outside autograd's bookkeeping."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        config = self.config
        double = f", scale_bits={config.scale_bits}" if config.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={config.bits}, "
                f"block_size={config.block_size}{double}, bias={self.bias is not None}")


register_kind(NFLinear, QuantizedLinearKind, label="NFLinear (lorakit.quant)")
