"""The trainer's component protocol, seen through components written here: every hook runs in the
documented order, a component may choose the examples, replace the optimizer step, add named loss terms,
keep state across a resume, and write the result; ``train()`` names no method."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import lorakit
from lorakit.config import TrainConfig
from lorakit.errors import TrainingError
from lorakit.methods.component import TrainingComponent
from lorakit.train import train
from tests.helpers import adapter_model, char_tokenizer, copy_examples, perturb, run_interrupted

CONFIG = TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=2, log_every=1, seed=1)


class Tracer(TrainingComponent):
    """Logs every hook call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def attach(self, model):
        self.calls.append("attach")

    def optimizer(self, model, parameters, config):
        self.calls.append("optimizer")

    def batches(self, encoded):
        self.calls.append("batches")
        return encoded

    def before_step(self, step, total):
        self.calls.append(f"before {step}/{total}")

    def losses(self, batch, outputs):
        self.calls.append("losses")
        return {}

    def step(self, optimizer):
        self.calls.append("step")
        return False

    def after_step(self, step, total):
        self.calls.append(f"after {step}")

    def finish(self):
        self.calls.append("finish")

    def save(self, model, tokenizer, out_dir):
        self.calls.append("save")
        return False


def test_the_hooks_run_in_the_documented_order(tmp_path):
    tracer = Tracer()
    config = TrainConfig(steps=2, batch_size=2, grad_accum=2)
    train(adapter_model(), char_tokenizer(), copy_examples(8), config, components=[tracer], out_dir=tmp_path,
          progress=False)
    step = ["losses", "losses", "step"]
    assert tracer.calls == ["attach", "batches", "optimizer", "before 0/2", *step, "after 0",
                            "before 1/2", *step, "after 1", "finish", "save"]
    assert (tmp_path / "adapter_model.safetensors").is_file()  # no component saved: the default did


def test_train_names_no_method():
    parameters = set(inspect.signature(train).parameters)
    assert parameters == {"model", "tokenizer", "examples", "config", "components", "out_dir", "eval_examples",
                          "resume", "overwrite", "progress"}


class FirstHalf(TrainingComponent):
    """A coreset of the first half of the examples."""

    def batches(self, encoded):
        return encoded[: len(encoded) // 2]


def test_a_component_chooses_the_examples():
    result = train(adapter_model(), char_tokenizer(), copy_examples(8), TrainConfig(epochs=1, batch_size=2),
                   components=[FirstHalf()], progress=False)
    assert result.steps == 2  # one epoch over 4 of the 8 examples


class TakesTheStep(TrainingComponent):
    """Takes every optimizer step itself, by leaving the weights as they are."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self, optimizer):
        self.steps += 1
        return True


def test_a_component_can_take_the_optimizer_step():
    model, taker = adapter_model(), TakesTheStep()
    perturb(model, "default")  # non-zero B: every factor has a gradient the optimizer would follow
    before = {k: v.clone() for k, v in lorakit.trainable_parameters(model).items()}
    train(model, char_tokenizer(), copy_examples(4), TrainConfig(steps=3, batch_size=2, lr=1e-2),
          components=[taker], progress=False)
    assert taker.steps == 3
    for name, value in lorakit.trainable_parameters(model).items():
        assert torch.equal(value, before[name]), name  # the trainer's own AdamW step never ran
    stepped = adapter_model()
    perturb(stepped, "default")
    train(stepped, char_tokenizer(), copy_examples(4), TrainConfig(steps=3, batch_size=2, lr=1e-2), progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in lorakit.trainable_parameters(stepped).items())


class Penalty(TrainingComponent):
    """A named extra term: the squared norm of the first adapter parameter, times ``weight``."""

    def __init__(self, name: str = "penalty", weight: float = 0.5) -> None:
        self.name, self.weight = name, weight

    def attach(self, model):
        self.parameter = next(p for p in model.parameters() if p.requires_grad)

    def losses(self, batch, outputs):
        return {self.name: self.weight * self.parameter.pow(2).sum()}


def test_named_terms_are_logged_apart_and_summed(tmp_path):
    train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=2, batch_size=2, log_every=1),
          components=[Penalty("a", 0.5), Penalty("b", 0.25)], out_dir=tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["a"] == pytest.approx(2 * line["b"], rel=1e-6)
        assert line["extra_loss"] == pytest.approx(line["a"] + line["b"], rel=1e-6)


def test_two_terms_of_one_name_are_refused():
    with pytest.raises(TrainingError, match="'penalty'"):
        train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2),
              components=[Penalty(), Penalty()], progress=False)


class Counter(TrainingComponent):
    """State that shapes training: a loss weight that grows with every step it has seen."""

    def __init__(self) -> None:
        self.seen = torch.zeros(())

    def attach(self, model):
        self.parameter = next(p for p in model.parameters() if p.requires_grad)

    def after_step(self, step, total):
        self.seen += 1

    def losses(self, batch, outputs):
        return {"counted": 0.1 * self.seen * self.parameter.pow(2).sum()}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"].clone()


def test_a_component_s_state_survives_a_resume_exactly(tmp_path, monkeypatch):
    tokenizer, examples = char_tokenizer(), copy_examples(8)
    straight = adapter_model()
    train(straight, tokenizer, examples, CONFIG, components=[Counter()], out_dir=tmp_path / "a", progress=False)
    run_interrupted(monkeypatch, 3, lambda: train(adapter_model(), tokenizer, examples, CONFIG,
                                                  components=[Counter()], out_dir=tmp_path / "b", progress=False))
    resumed, counter = adapter_model(adapter_seed=7), Counter()
    train(resumed, tokenizer, examples, CONFIG, components=[counter], out_dir=tmp_path / "b", resume=tmp_path / "b",
          progress=False)
    assert counter.seen.item() == 4
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()


class WritesMarker(TrainingComponent):
    def save(self, model, tokenizer, out_dir):
        (out_dir / "marker.txt").write_text("mine")
        return True


def test_the_first_component_that_saves_replaces_the_default_save(tmp_path):
    train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2),
          components=[WritesMarker(), Tracer()], out_dir=tmp_path, progress=False)
    assert (tmp_path / "marker.txt").read_text() == "mine"
    assert not (tmp_path / "adapter_model.safetensors").exists()


class SuppliesSgd(TrainingComponent):
    def optimizer(self, model, parameters, config):
        return torch.optim.SGD(parameters, lr=config.lr)

    def step(self, optimizer):
        self.stepped_with = optimizer
        return False


def test_a_component_supplies_the_optimizer_and_two_suppliers_are_refused():
    sgd, default = SuppliesSgd(), Tracer()
    train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2),
          components=[sgd], progress=False)
    assert type(sgd.stepped_with) is torch.optim.SGD
    observer = SuppliesSgd()
    observer.optimizer = lambda *args: None  # observes the step only
    train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, batch_size=2),
          components=[default, observer], progress=False)
    assert type(observer.stepped_with) is torch.optim.AdamW
    with pytest.raises(lorakit.ConfigError, match="two components supply the optimizer"):
        train(adapter_model(), char_tokenizer(), copy_examples(4), TrainConfig(steps=1, optimizer="allora"),
              components=[SuppliesSgd()], progress=False)
