"""L4Q's memory-optimised linear: ``y = x W_q^T + bias`` with ``W_q`` the fake-quantized ``W0 + s B A``.

The forward saves only ``x, W0, A, B, Delta, z`` (``W0`` is the layer's own frozen weight, so saving it costs
nothing); nothing weight-sized is kept for the backward. The backward (Jeon, Kim, Kim, ACL'25, arXiv
2402.04902) walks the output rows in tiles; per tile (rows ``R``, ``G = dL/dy[:, R]``) it recomputes ``W_q``
and forms the weight gradient only transiently::

    dL/dW_q  = G^T x                                       (t, in), this tile only
    dL/dW'   = dL/dW_q * 1[Qn <= round(u) <= Qp]           straight through round, zero where clamped
    dL/dB[R] = s dL/dW' A^T            dL/dA += s B[R]^T dL/dW'
    dL/dDelta = sum over the group of dL/dW_q * (round(u) - u   in range;   q + z   clamped)
    dL/dz     = sum over the group of dL/dW_q * (0              in range;   Delta   clamped)
    dL/dx    += G W_q[R]

With ``lsq_grad_scale`` both quantizer gradients are multiplied by LSQ's ``1 / sqrt(N_group * Qp)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.quant.l4q.config import L4QConfig
from lorakit.quant.l4q.fake_quant import (
    fake_quantize_,
    fake_quantize_backward_,
    group_sizes,
    grouped_matmul,
    merged_rows,
    row_tiles,
    ungrouped,
)


class L4QMatmul(torch.autograd.Function):
    """``L4QMatmul.apply(x, W0, A, B, step, offset, bias, scale, config)``: see the module docstring.

    ``x`` (..., in), ``W0`` (out, in) frozen, ``A`` (r, in), ``B`` (out, r), ``step`` and ``offset`` (out, G),
    ``bias`` (out,) or None (frozen); ``scale`` is LoRA's ``s``. Gradients flow to ``x, A, B, step, offset``."""

    @staticmethod
    def forward(ctx, x, W0, A, B, step, offset, bias, scale: float, config: L4QConfig):
        ctx.save_for_backward(x, W0, A, B, step, offset)
        ctx.scale, ctx.config = scale, config
        out_features, in_features = W0.shape
        parts = []
        for rows in row_tiles(out_features, in_features, config.tile_elements):
            quantized = fake_quantize_(merged_rows(W0, A, B, scale, rows, config.group_size),
                                       step[rows], offset[rows], config)
            weight = ungrouped(quantized, in_features).to(x.dtype)  # (t, in)
            parts.append(F.linear(x, weight, None if bias is None else bias[rows].to(x.dtype)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x, W0, A, B, step, offset = ctx.saved_tensors
        scale, config = ctx.scale, ctx.config
        out_features, in_features = W0.shape
        flat_grad = grad.reshape(-1, out_features)  # (N, out)
        flat_x = x.reshape(-1, in_features).to(A.dtype)  # (N, in); the weight gradient in the adapter's dtype
        grad_x = None
        grad_A, grad_B = torch.zeros_like(A), torch.empty_like(B)
        grad_step, grad_offset = torch.empty_like(step), torch.empty_like(offset)
        for rows in row_tiles(out_features, in_features, config.tile_elements):
            tile_grad = flat_grad[:, rows]  # (N, t)
            grad_weight = grouped_matmul(tile_grad.t().to(A.dtype), flat_x, config.group_size)  # (t, G, g)
            quantized, grad_merged, grad_step[rows], grad_offset[rows] = fake_quantize_backward_(
                merged_rows(W0, A, B, scale, rows, config.group_size), grad_weight, step[rows], offset[rows], config)
            if ctx.needs_input_grad[0]:
                weight = ungrouped(quantized, in_features).to(tile_grad.dtype)  # (t, in)
                grad_x = tile_grad @ weight if grad_x is None else grad_x.addmm_(tile_grad, weight)
            grad_merged = ungrouped(grad_merged, in_features)  # (t, in)
            torch.mm(grad_merged, A.t(), out=grad_B[rows]).mul_(scale)
            grad_A.addmm_(B[rows].t(), grad_merged, alpha=scale)
        if config.lsq_grad_scale:
            lsq = (group_sizes(in_features, config.group_size, step.device) * config.qmax).to(step.dtype).rsqrt()
            grad_step.mul_(lsq)
            grad_offset.mul_(lsq)
        grad_bias = flat_grad.sum(0) if ctx.needs_input_grad[6] else None
        grad_x = None if grad_x is None else grad_x.reshape(x.shape)
        return grad_x, None, grad_A, grad_B, grad_step, grad_offset, grad_bias, None, None


def l4q_matmul(x: torch.Tensor, W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, step: torch.Tensor,
               offset: torch.Tensor, bias: torch.Tensor | None, scale: float, config: L4QConfig) -> torch.Tensor:
    """``x W_q^T + bias`` through :class:`L4QMatmul` (the module docstring's forward and backward)."""
    return L4QMatmul.apply(x, W0, A, B, step, offset, bias, scale, config)
