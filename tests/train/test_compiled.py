"""Training with the body compiled: the eager loss and gradients (to fused-kernel rounding), the eager
forward restored afterwards, and the trainer compiling only when asked."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.methods.component import TrainingComponent
from lorakit.models.supervised_loss import logits_loss, supervised_outputs
from lorakit.train.compiled import compiled_body
from lorakit.train.loop import train
from tests.helpers import adapter_model, char_tokenizer, copy_examples, labelled_batch, tiny_llama


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


class SeesTheBody(TrainingComponent):
    """Records, before each step, whether the decoder body's forward is the compiled one."""

    def attach(self, model) -> None:
        self.body, self.compiled = model.base_model, []

    def before_step(self, step: int, total: int) -> None:
        self.compiled.append("forward" in vars(self.body))


def test_the_trainer_runs_the_compiled_body_only_when_asked():
    for compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        seen, model = SeesTheBody(), adapter_model()
        train(model, char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2, compile=compile),
              components=[seen], progress=False)
        assert seen.compiled == [compile]
        assert (counters["stats"]["unique_graphs"] > 0) == compile  # dynamo really compiled the body
        assert "forward" not in vars(model.base_model)


def test_a_forward_set_on_the_instance_before_is_restored():
    body = tiny_llama().base_model
    own = body.forward
    body.forward = own  # e.g. a hook library's wrapper on the instance
    with compiled_body(body):
        assert vars(body)["forward"] is not own
    assert vars(body)["forward"] is own
