"""The fused head + cross-entropy: the same per-token losses and input gradients as the plain head and
``F.cross_entropy``, over any number of row blocks, and the trainer's loss takes it without the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models import head_loss
from lorakit.models.head_loss import fusable_head, head_token_losses
from lorakit.models.supervised_loss import logits_loss, supervised_outputs
from tests.helpers import adapted, labelled_batch, reference, tiny_llama


def frozen_head(vocab: int = 37, width: int = 8, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(width, vocab, bias=bias)
    head.requires_grad_(False)
    return head


@pytest.mark.parametrize("block_elements", [1 << 24, 37 * 3, 37], ids=["one-block", "uneven-blocks", "row-by-row"])
@pytest.mark.parametrize("columns", [1024, 10, 1], ids=["all-columns", "uneven-columns", "column-by-column"])
@pytest.mark.parametrize("bias", [True, False])
def test_losses_and_input_gradients_equal_the_plain_head_and_cross_entropy(monkeypatch, block_elements, columns, bias):
    monkeypatch.setattr(head_loss, "LOGITS_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(head_loss, "CPU_VOCAB_COLUMNS", columns)
    head, targets = frozen_head(bias=bias), torch.randint(0, 37, (10,))
    hidden = (torch.randn(10, 8) * 3).requires_grad_()
    upstream = torch.rand(10) + 0.5  # per-token weights: the backward must scale each token's gradient
    fused = head_token_losses(hidden, head, targets)
    (fused * upstream).sum().backward()
    fused_grad, hidden.grad = hidden.grad, None
    plain = F.cross_entropy(head(hidden), targets, reduction="none")
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grad, hidden.grad, atol=1e-6, rtol=1e-6)


def test_extreme_logits_stay_finite_and_exact():
    head, targets = frozen_head(bias=False), torch.tensor([0, 5])
    hidden = torch.randn(2, 8) * 1e3  # logit gaps in the thousands: a naive softmax overflows
    torch.testing.assert_close(head_token_losses(hidden, head, targets),
                               F.cross_entropy(head(hidden), targets, reduction="none"), rtol=1e-6, atol=1e-3)


def test_no_supervised_tokens_gives_an_empty_loss():
    losses = head_token_losses(torch.zeros(0, 8, requires_grad=True), frozen_head(), torch.zeros(0, dtype=torch.long))
    assert losses.shape == (0,) and losses.sum().item() == 0.0


def test_only_a_frozen_plain_linear_head_is_fused():
    assert fusable_head(frozen_head())
    assert not fusable_head(nn.Linear(8, 37))  # a trainable head needs its weight gradient
    assert not fusable_head(nn.Embedding(37, 8))


def test_the_trainers_loss_never_builds_the_logits_and_matches_the_full_logits_loss():
    model, batch = adapted(tiny_llama), labelled_batch()
    outputs = supervised_outputs(model, batch)
    loss = logits_loss(outputs)
    assert not outputs.has_logits
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = F.cross_entropy(reference(model, batch), outputs.targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    assert fused
    for name, grad in fused.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4, msg=name)
