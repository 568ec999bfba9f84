"""L4Q's asymmetric uniform per-group quantizer (Jeon, Kim, Kim, ACL'25, arXiv 2402.04902).

A weight ``W`` (out, in) is cut along its input dimension into groups of ``g`` columns (the last one shorter
when ``g`` does not divide ``in``); group ``(o, j)`` has a step ``Delta[o, j]`` and a real offset ``z[o, j]``::

    q   = clamp(round(W / Delta - z), Qn, Qp)        Qn = 0, Qp = 2^b - 1   (unsigned codes)
    W_q = Delta * (q + z)

``round`` is round-half-to-even (``torch.round``). Min-max initialisation makes ``W_q`` the round-to-nearest
quantization of ``W`` onto ``2^b`` levels spanning each group's range: ``Delta = (max - min) / Qp``,
``z = min / Delta``, so ``W / Delta - z = (W - min) / Delta`` runs over ``[0, Qp]``.

Every routine works on output-row tiles, ``grouped``: a tile (t, in) viewed as (t, G, g), zero-padded to
``G * g`` columns when ``g`` does not divide ``in`` (a view, no copy, when it does). The forward, the backward
and :meth:`~lorakit.quant.l4q.l4q_linear.L4QLinear.finalize` compute ``W' = W0 + s B A`` and its
quantization with the same calls on the same tiles, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lorakit.quant.l4q.config import L4QConfig


def row_tiles(out_features: int, in_features: int, tile_elements: int) -> Iterator[slice]:
    """Slices of whole output rows holding at most ``tile_elements`` weights each (at least one row)."""
    rows = max(1, tile_elements // max(1, in_features))
    for start in range(0, out_features, rows):
        yield slice(start, min(start + rows, out_features))


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, in) -> (rows, G, g): a view when ``g`` divides ``in``, else a copy with the last group zero-padded."""
    pad = (-t.shape[1]) % group_size
    if pad:
        t = F.pad(t, (0, pad))
    return t.unflatten(1, (-1, group_size))


def ungrouped(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """(rows, G, g) -> (rows, in), the padding dropped (a strided view)."""
    return t.flatten(1)[:, :in_features]


def group_sizes(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """How many real columns each group has, (G,): ``g`` each, the last one possibly fewer."""
    groups = -(-in_features // group_size)
    sizes = torch.full((groups,), group_size, device=device)
    sizes[-1] = in_features - group_size * (groups - 1)
    return sizes


@torch.no_grad()
def minmax_init(weight: torch.Tensor, config: L4QConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Delta, z)``, each float32 (out, G), from each group's min and max of ``weight`` (out, in).

    ``Delta = (max - min) / Qp`` and ``z = min / Delta``. A constant group (``max == min = c``) gets
    ``Delta = |c|`` and ``z = sign(c)`` (``Delta = 1e-8``, ``z = 0`` for an all-zero group), so it still
    dequantizes to ``c`` exactly at code 0, and no step is ever zero."""
    w = weight.detach().to(torch.float32)
    pad = (-w.shape[1]) % config.group_size
    low = F.pad(w, (0, pad), value=float("inf")).unflatten(1, (-1, config.group_size)).amin(-1)  # (out, G)
    high = F.pad(w, (0, pad), value=float("-inf")).unflatten(1, (-1, config.group_size)).amax(-1)
    span = high - low
    step = torch.where(span > 0, span / config.qmax, low.abs().clamp_min(1e-8))
    return step, low / step


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, group_size: int, base: torch.Tensor | None = None,
                   alpha: float = 1.0) -> torch.Tensor:
    """``base + alpha a b`` (or ``a b``), (t, n), as a new grouped tensor (t, G, g) with zeros in the padding:
    the product is written straight into the padded buffer (BLAS takes the row stride), no copy."""
    rows, cols = a.shape[0], b.shape[1]
    pad = (-cols) % group_size
    out = a.new_empty(rows, cols + pad)  # (t, G * g)
    if pad:
        out[:, cols:] = 0
    if base is None:
        torch.mm(a, b, out=out[:, :cols])
    else:
        torch.addmm(base, a, b, alpha=alpha, out=out[:, :cols])
    return out.unflatten(1, (-1, group_size))


def merged_rows(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, rows: slice,
                group_size: int) -> torch.Tensor:
    """``W' = W0 + s B A`` on output rows ``rows``, grouped (t, G, g) with zeros in the padding, in ``A``'s
    dtype: a new tensor."""
    return grouped_matmul(B[rows], A, group_size, base=W0[rows].to(A.dtype), alpha=scale)


def codes_(merged: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, config: L4QConfig) -> torch.Tensor:
    """In place on a grouped tile (t, G, g): ``W' -> q = clamp(round(W' / Delta - z), Qn, Qp)`` (still float).

    ``W' / Delta - z`` is computed as one ``addcmul``, ``W' * (1 / Delta) - z``, here and in the backward."""
    u = torch.addcmul(-offset[..., None], merged, step.reciprocal()[..., None], out=merged)
    return u.round_().clamp_(config.qmin, config.qmax)


def dequantize_(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """In place on float codes, grouped (t, G, g): ``q -> Delta * (q + z)``, computed as one ``addcmul``,
    ``Delta z + Delta q``, by every routine that dequantizes (so all agree bit for bit)."""
    return torch.addcmul((offset * step)[..., None], codes, step[..., None], out=codes)


def fake_quantize_(merged: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
                   config: L4QConfig) -> torch.Tensor:
    """In place on a grouped tile: ``W' -> W_q = Delta * (clamp(round(W' / Delta - z), Qn, Qp) + z)``."""
    return dequantize_(codes_(merged, step, offset, config), step, offset)


def fake_quantize_backward_(merged: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
                            config: L4QConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_q, dL/dW', dL/dDelta, dL/dz)`` of a grouped tile, from ``W'`` and ``grad = dL/dW_q`` (both (t, G, g),
    both consumed in place; the step and offset gradients are (t, G)).

    With ``u = W' / Delta - z``, ``r = round(u)``, ``q = clamp(r, Qn, Qp)`` and ``c = 1`` where ``r`` is clamped
    (``r != q``), else 0; straight through the rounding::

        dL/dW'    = grad (1 - c)
        dL/dDelta = sum_group  grad ((r - u)(1 - c) + (q + z) c)
        dL/dz     = Delta sum_group  grad c

    ``c`` is a float 0/1, not a boolean mask, so that each step is one float pass (CPU comparisons into
    booleans and ``where`` are several times slower). ``W_q`` is bit for bit :func:`fake_quantize_`'s."""
    u = torch.addcmul(-offset[..., None], merged, step.reciprocal()[..., None], out=merged)
    rounded = u.round()
    residual = torch.sub(rounded, u, out=u)  # r - u, over u's storage
    codes = rounded.clamp(config.qmin, config.qmax)  # q
    clamped_grad = torch.ne(rounded, codes, out=rounded).mul_(grad)  # grad c, over r's storage
    clamped_sum = clamped_grad.sum(-1)  # (t, G)
    grad_merged = grad.sub_(clamped_grad)  # grad (1 - c), exactly: x - x = 0
    # Group-wise dot products (one batched matmul each) write no (t, G, g) temporary, unlike (a * b).sum(-1).
    grad_step = _group_dot(residual, grad_merged) + _group_dot(clamped_grad, codes) + clamped_sum * offset
    return dequantize_(codes, step, offset), grad_merged, grad_step, clamped_sum * step


def _group_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_k a[t, j, k] b[t, j, k]``, (t, G), for grouped (t, G, g) tensors."""
    return torch.einsum("tjk,tjk->tj", a, b)
