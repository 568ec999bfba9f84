"""Every training component through the same life: train -> save -> ``lorakit.load`` -> resume.

For each method the trained model and what ``lorakit.load`` reads back from the run's directory give the
same logits, and a run interrupted after its first checkpoint and resumed saves what the uninterrupted run
saved (both read back through ``lorakit.load``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.data.example import Example
from lorakit.methods.component import TrainingComponent, WritesResult
from lorakit.mixtures.meteora import MeteoraConfig, MeteoraModel, MeteoraTaskLoss, save_meteora
from lorakit.mixtures.mixlora import MixLoraConfig, attach_mixlora
from lorakit.train import train
from lorakit.train.combinations import prepared_lora
from lorakit.train.multi import JointAdapters
from lorakit.train.prepare import prepare_adapter
from tests.helpers import char_tokenizer, copy_examples, perturb, run_interrupted, tiny_llama, token_batch

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
BASE = TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, seed=3)


@dataclass
class Case:
    """One component's run: the model it trains, its config and components, and what the result loads into."""

    config: TrainConfig = BASE
    model: Callable[[], nn.Module] = tiny_llama
    components: Callable[[nn.Module], list[TrainingComponent]] = lambda model: []
    examples: Callable[[], list[Example]] = lambda: copy_examples(16)
    into: Callable[[], nn.Module] = tiny_llama
    """A fresh model that ``lorakit.load`` loads the result into."""
    result: str = ""
    """The result's directory inside the run directory."""
    view: Callable[[nn.Module], contextlib.AbstractContextManager] = lambda model: contextlib.nullcontext()
    """How the trained model shows what the result holds (e.g. one of several adapters active)."""
    init: str | None = None
    """A data-driven init run before training (its components join the run)."""


def attached(config: TrainConfig) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = tiny_llama()
        torch.manual_seed(0)
        lorakit.attach(model, prepared_lora(LORA, config))
        return model
    return make


def mixlora() -> nn.Module:
    model = tiny_llama()
    attach_mixlora(model, MixLoraConfig(num_experts=3, top_k=2, rank=2, alpha=4), seed=0)
    return model


def two_adapters() -> nn.Module:
    model = tiny_llama()
    torch.manual_seed(0)
    for name in ("a", "b"):
        lorakit.attach(model, LORA, name, activate=False)
    return model


def with_task_adapters() -> nn.Module:
    model = tiny_llama()
    for index, name in enumerate(("copy", "upper")):
        lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), name, activate=False)
        perturb(model, name, seed=index)
    return model


def meteora() -> MeteoraModel:
    torch.manual_seed(0)
    return MeteoraModel(with_task_adapters(), ["copy", "upper"], MeteoraConfig(top_k=1))


def tasks() -> list[Example]:
    return [Example(prompt=f"{task}: {e.completion}", completion=e.completion, task=task)
            for task in ("copy", "upper") for e in copy_examples(8, seed=len(task))]


def meteora_components(xmodel) -> list[TrainingComponent]:
    return [MeteoraTaskLoss(xmodel), WritesResult(lambda directory: save_meteora(xmodel, directory))]


def joint(model) -> list[TrainingComponent]:
    return [JointAdapters(["a"] * 8 + ["b"] * 8)]


def with_config(**changes) -> Case:
    config = dataclasses.replace(BASE, **changes)
    return Case(config=config, model=attached(config))


CASES = {
    "lora": with_config(),
    "dylora": with_config(method="dylora"),
    "codyra": with_config(method="codyra", options={"codyra_max_kappa": 0.05}),
    "lora-pro": with_config(optimizer="lora-pro"),
    "allora": with_config(optimizer="allora"),
    "ba-lora": with_config(regularizer="ba-lora"),
    "mixlora": Case(config=dataclasses.replace(BASE, method="mixlora"), model=mixlora),
    "l4q": with_config(method="l4q", options={"l4q_group_size": 16, "l4q_bits": 3}),
    "pat": dataclasses.replace(with_config(method="pat", options={"pat_rank": 4, "pat_freeze": 0.5}),
                               into=lambda: None),  # a narrower model of its own; hard from step 2 on
    "joint": Case(model=two_adapters, components=joint, result="a", view=lambda m: lorakit.active(m, "a")),
    "lora-ga": Case(init="lora-ga"),
    "meteora": Case(model=meteora, components=meteora_components, examples=tasks, into=with_task_adapters),
    "seco": with_config(chunk_size=7),
    "spaco": with_config(chunk_size=7, sparse_chunks=2),  # each micro-batch's draw, again on resume
    "spaco-unbiased": with_config(chunk_size=7, sparse_chunks=2, sparse_chunk_estimator="unbiased"),
    "joint-seco": Case(config=dataclasses.replace(BASE, chunk_size=7), model=two_adapters, components=joint,
                       result="a", view=lambda m: lorakit.active(m, "a")),
}


def run(case: Case, out, *, resume: bool = False) -> nn.Module:
    model, examples = case.model(), case.examples()
    components = case.components(model)
    if case.init is not None:
        lora = dataclasses.replace(LORA, init=case.init)
        components += prepare_adapter(model, char_tokenizer(), examples, lora, case.config, run_dir=out,
                                      resume=resume).components
    train(model, char_tokenizer(), examples, case.config, components=components, out_dir=out,
          resume=out if resume else None, overwrite=True, progress=False)
    return model.eval()


def loaded_logits(case: Case, directory) -> torch.Tensor:
    loaded = lorakit.load(directory / case.result, case.into())
    with torch.no_grad():
        return loaded.model.eval()(token_batch()).logits


@pytest.mark.parametrize("name", list(CASES))
def test_train_save_load_resume(name, tmp_path, monkeypatch):
    case = CASES[name]
    trained = run(case, tmp_path / "a")
    with torch.no_grad(), case.view(trained):
        expected = trained(token_batch()).logits
    torch.testing.assert_close(loaded_logits(case, tmp_path / "a"), expected, atol=2e-5, rtol=1e-5)
    run_interrupted(monkeypatch, 3, lambda: run(case, tmp_path / "b"))
    assert not (tmp_path / "b" / case.result / "lorakit.json").exists()  # no result before the run ends
    run(case, tmp_path / "b", resume=True)
    torch.testing.assert_close(loaded_logits(case, tmp_path / "b"), loaded_logits(case, tmp_path / "a"),
                               atol=1e-6, rtol=0)
