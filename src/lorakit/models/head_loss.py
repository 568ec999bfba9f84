"""The output head and the next-token cross-entropy in one pass, a block of rows at a time.

For hidden states ``h`` (M x d) of the supervised positions, a frozen head ``W`` (V x d, bias ``b``)
and targets ``y``, each token's loss is ``l_i = logsumexp(z_i) - z_{i,y_i}`` with ``z_i = W h_i + b``,
and its gradient is ``dl_i/dh_i = (softmax(z_i) - onehot(y_i)) W``. Both are computed together, for
``rows`` tokens at a time in one reused (rows x V) buffer: the (M x V) logits, their log-softmax and
their gradient are never held in memory (with SmolLM2's 49,152-word vocabulary they are 200 MB each
for a batch of 1,024 tokens), and the logits are computed once, not again in the backward pass. The
backward pass multiplies the stored ``dl_i/dh_i`` by each token's incoming gradient, which is exact
because ``l_i`` depends on ``h_i`` alone. The same idea as the fused linear cross-entropy of Liger
Kernel (Hsu et al., 2024, arXiv:2410.10989); only the frozen-head case (the LoRA case) is fused here.
"""

from __future__ import annotations

import torch
from torch import nn

LOGITS_BLOCK_ELEMENTS = 1 << 24
"""How many logits one block holds (64 MiB in fp32): the block's rows are this divided by V."""

CPU_VOCAB_COLUMNS = 1024
"""On the CPU a block's logits are computed this many vocabulary columns at a time: (341 x 1024) products
written into the block ran 1.19x faster than one (341 x 49,152) product (MKL, measured in
``docs/results/performance.md``); a GPU gets the one large product."""


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision losses are computed in: fp32 for fp32 and narrower models, fp64 for fp64 ones."""
    return torch.promote_types(dtype, torch.float32)


def fusable_head(head: nn.Module) -> bool:
    """Whether ``head`` is a plain linear layer whose parameters take no gradient (the fused path's case)."""
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


def head_token_losses(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Each token's ``logsumexp(z_i) - z_{i,y_i}`` for ``z = head(hidden)``, ``(M,)`` in fp32 (fp64 for an fp64
    model: :func:`loss_dtype`), differentiable
    in ``hidden`` (see the module docstring); ``head`` must satisfy :func:`fusable_head`."""
    return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        wants_grad = ctx.needs_input_grad[0]
        dtype = loss_dtype(hidden.dtype)
        losses = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if wants_grad else None
        rows = max(1, LOGITS_BLOCK_ELEMENTS // weight.shape[0])
        block = hidden.new_empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=dtype)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            chunk = hidden[part]
            logits = _block_logits(chunk, weight, bias, block[:chunk.shape[0]])
            losses[part] = _softmax_in_place(logits, targets[part])
            if wants_grad:
                logits[torch.arange(logits.shape[0], device=logits.device), targets[part]] -= 1.0
                grad[part] = logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses.unsqueeze(-1).to(grad.dtype), None, None, None


def _block_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor) -> torch.Tensor:
    """``hidden W^T + b`` in fp32, written into ``out`` (one buffer reused for every block: a fresh 64 MiB
    buffer per block would cost a page fault per page), :data:`CPU_VOCAB_COLUMNS` columns at a time on the CPU."""
    if weight.dtype != torch.float32:
        return out.copy_(torch.nn.functional.linear(hidden, weight, bias))
    columns = CPU_VOCAB_COLUMNS if out.device.type == "cpu" else weight.shape[0]
    for start in range(0, weight.shape[0], columns):
        torch.mm(hidden, weight[start:start + columns].t(), out=out[:, start:start + columns])
    return out if bias is None else out.add_(bias)


def _softmax_in_place(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turn ``logits`` into ``softmax(logits)`` in place; return ``logsumexp - logit of the target`` per row."""
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    logits.sub_(peak).exp_()
    total = logits.sum(dim=1, keepdim=True)
    logits.div_(total)
    return (peak + total.log()).squeeze(1) - target_logits
