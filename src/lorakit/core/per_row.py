"""Mixed batches computed stacked: one adapter per batch row, no Python loop over adapters.

For a linear-type layer with the batch's distinct adapters ``1..N`` the factors are stacked once,
``A`` as ``(N + 1, R, d_in)`` and ``s B`` as ``(N + 1, d_out, R)`` with ``R`` the largest rank (smaller
ranks zero-padded, which adds nothing) and slot ``N + 1`` all zeros for rows routed to ``None``. Each
row then gathers its own slot and two batched products give every row's delta at once::

    delta_b = (x_b A_{j(b)}^T) (s_{j(b)} B_{j(b)})^T        # (T, d_out) for row b with adapter j(b)

Without autograd the stack is cached on the layer until an adapter's parameters change; with
autograd the stack is rebuilt each call and gradients flow back to each adapter's own ``A`` and ``B``
(several adapters trained in one batch). Embedding and Conv2d layers, and dropout in training (one
mask per adapter), take the per-adapter gather/scatter path in :mod:`lorakit.core.layer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.core.adapter import LoraAdapter
from lorakit.core.stack_cache import cached_without_grad, factors_key


def stacked_factors(adapters: list[LoraAdapter], cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_stack, sB_stack)`` of ``adapters`` plus a zero slot; cached in ``cache`` without autograd."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        factors = [a.factors() for a in adapters]
        rank = max(A.shape[0] for A, _, _ in factors)
        stacked_A = torch.stack([F.pad(A, (0, 0, 0, rank - A.shape[0])) for A, _, _ in factors])  # (N, R, d_in)
        stacked_B = torch.stack([F.pad(B * scale, (0, rank - B.shape[1])) for _, B, scale in factors])  # (N, d_out, R)
        return F.pad(stacked_A, (0, 0, 0, 0, 0, 1)), F.pad(stacked_B, (0, 0, 0, 0, 0, 1))  # zero slot last

    return cached_without_grad(cache, "per_row", factors_key(adapters), build)


def per_row_delta(x: torch.Tensor, slots: torch.Tensor, stacked_A: torch.Tensor,
                  stacked_B: torch.Tensor) -> torch.Tensor:
    """Row ``b``'s delta ``(x_b A_j^T)(s_j B_j)^T`` for ``j = slots[b]``; ``x`` is (batch, ..., d_in)."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1, x.shape[-1]).to(stacked_A.dtype)  # (batch, T, d_in)
    code = torch.bmm(flat, stacked_A.index_select(0, slots).transpose(1, 2))  # (batch, T, R)
    delta = torch.bmm(code, stacked_B.index_select(0, slots).transpose(1, 2))  # (batch, T, d_out)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])
