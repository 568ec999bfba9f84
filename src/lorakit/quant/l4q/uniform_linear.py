"""The frozen result of L4Q: a linear layer holding only integer codes and per-group ``(Delta, z)``.

``UniformQuantizedLinear`` computes ``y = x W^T + bias`` with ``W = Delta * (codes + z)`` (Jeon, Kim, Kim,
ACL'25, arXiv 2402.04902): after training the adapter lives inside the codes, and no side adapter remains.
``codes`` is uint8 (out, in), one code per byte, each at most ``2^bits - 1``; ``step`` and ``offset`` are
float32 (out, G) with ``G = ceil(in / group_size)``. The weight is dequantized to the input's dtype on every
forward with the same calls the :class:`~lorakit.quant.l4q.l4q_linear.L4QLinear` forward uses, so a finalized
layer computes what the trained one did, bit for bit. Registered as a quantized linear kind, so LoRA can
adapt it again (beside it, as QLoRA does); merging into it is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.kinds import QuantizedLinearKind, register_kind
from lorakit.errors import FormatError
from lorakit.quant.l4q.config import L4QConfig
from lorakit.quant.l4q.fake_quant import dequantize_, grouped, row_tiles, ungrouped


class UniformQuantizedLinear(nn.Module):
    """``y = x (Delta (codes + z))^T + bias``; nothing in it trains (codes, step, offset and bias are buffers)."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None,
                 config: L4QConfig, *, where: str = "UniformQuantizedLinear", prefix: str = "") -> None:
        """Refuses bad parts (:func:`check_parts`), naming ``where`` and the tensor ``prefix + part``."""
        super().__init__()
        check_parts(codes, step, offset, bias, config, where=where, prefix=prefix)
        self.out_features, self.in_features = codes.shape
        self.config = config
        self.register_buffer("codes", codes.detach().clone())
        self.register_buffer("step", step.detach().to(torch.float32).clone())
        self.register_buffer("offset", offset.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def quantization_scheme(self) -> str:
        """What adapters trained on this layer record as their base's quantization: ``"l4q-int4-g128"``, ..."""
        return f"l4q-int{self.config.bits}-g{self.config.group_size}"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Delta * (codes + z)`` (out, in) in ``dtype`` (default float32), tile by tile as the trained layer did."""
        tiles = [self._tile(rows) for rows in self._tiles()]
        weight = tiles[0] if len(tiles) == 1 else torch.cat(tiles)
        return weight if dtype is None else weight.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), a new float32 tensor on every call (writing into it changes nothing)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Tile by tile, as L4QMatmul's forward: the same products, so the same logits bit for bit.
        parts = [F.linear(x, self._tile(rows).to(x.dtype), None if self.bias is None else self.bias[rows].to(x.dtype))
                 for rows in self._tiles()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _tiles(self):
        return row_tiles(self.out_features, self.in_features, self.config.tile_elements)

    def _tile(self, rows: slice) -> torch.Tensor:
        """Output rows ``rows`` of the dequantized weight, (t, in) float32."""
        codes = grouped(self.codes[rows].to(self.step.dtype), self.config.group_size)  # (t, G, g)
        return ungrouped(dequantize_(codes, self.step[rows], self.offset[rows]), self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.config.bits}, "
                f"group_size={self.config.group_size}, bias={self.bias is not None}")


def check_parts(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None,
                config: L4QConfig, *, where: str, prefix: str = "") -> None:
    """Refuse, with a :class:`FormatError` naming ``where`` and the tensor (``prefix + part``), codes that are not
    uint8 (out, in) or exceed ``2^bits - 1``, steps and offsets that are not float (out, G) or not finite, a zero
    step, and a bias that is not (out,)."""
    def fail(part: str, problem: str) -> FormatError:
        return FormatError(f"{where}: tensor {prefix + part!r}: {problem}")

    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise fail("codes", f"is {codes.dtype} of shape {list(codes.shape)}; uint8 (out, in) expected")
    out_features, in_features = codes.shape
    expected = [out_features, config.groups(in_features)]
    for name, part in (("step", step), ("offset", offset)):
        if not part.is_floating_point() or list(part.shape) != expected:
            raise fail(name, f"is {part.dtype} of shape {list(part.shape)}; a float tensor of shape {expected} "
                             f"expected (one per group of {config.group_size} of the {in_features} columns)")
        if not torch.isfinite(part).all():
            raise fail(name, "holds non-finite values (NaN or inf)")
    if (step == 0).any():
        raise fail("step", "holds a zero step")
    if codes.numel() and int(codes.max()) > config.qmax:
        raise fail("codes", f"holds code {int(codes.max())}, above {config.qmax} = 2^{config.bits} - 1")
    if bias is not None and (not bias.is_floating_point() or list(bias.shape) != [out_features]):
        raise fail("bias", f"is {bias.dtype} of shape {list(bias.shape)}; a float tensor of shape "
                           f"[{out_features}] expected")


register_kind(UniformQuantizedLinear, QuantizedLinearKind, label="UniformQuantizedLinear (lorakit.quant.l4q)")
