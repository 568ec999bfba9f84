"""Training with the body compiled: the eager loss and gradients (to fused-kernel rounding), the eager
forward restored afterwards, and the trainer compiling only when asked."""

from __future__ import annotations

import contextlib

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.train import loop
from lorakit.train.compiled import compiled_body
from lorakit.models.supervised_loss import logits_loss, supervised_outputs
from tests.helpers import char_tokenizer, tiny_llama
from tests.train.test_loop import adapter_model, copy_examples
from tests.train.test_supervised_logits import labelled_batch


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = logits_loss(supervised_outputs(model, batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_compiled_body_gives_the_eager_loss_and_gradients_and_is_undone():
    model, batch = tiny_llama(), labelled_batch()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))  # no dropout: deterministic
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_(std=0.1)  # non-zero B: every adapter product matters
    eager_loss, eager_grads = loss_and_gradients(model, batch)
    with compiled_body(model):
        assert "forward" in vars(model.base_model)
        loss, grads = loss_and_gradients(model, batch)
    assert "forward" not in vars(model.base_model)
    torch.testing.assert_close(loss, eager_loss, atol=1e-4, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-3, msg=name)


def test_the_trainer_compiles_only_when_asked(monkeypatch):
    asked = []

    @contextlib.contextmanager
    def recording(model, enabled=True):
        asked.append(enabled)
        yield

    monkeypatch.setattr(loop, "compiled_body", recording)
    for compile in (False, True):
        loop.train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2, compile=compile),
                   progress=False)
    assert asked == [False, True]
