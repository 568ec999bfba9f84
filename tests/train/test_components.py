"""The trainer's optimizer/method/regularizer registries, their options, and the refused combinations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.models.supervised_loss import supervised_outputs
from lorakit.optim.allora import Allora
from lorakit.optim.lora_pro import LoraPro
from lorakit.regularizers.ba_lora import ba_lora_terms
from lorakit.regularizers.ba_lora_training import BaLoraRegularizer
from lorakit.train import train
from lorakit.train.combinations import check_combination, prepared_lora, scale_free
from lorakit.train.components import (
    METHODS,
    OPTIMIZERS,
    REGULARIZERS,
    OptimizerChoice,
    check_components,
    components_for,
)
from tests.helpers import char_tokenizer, copy_examples, run_interrupted, tiny_llama

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "lm_head"))


def attached(seed: int = 0):
    model = tiny_llama()
    torch.manual_seed(seed)
    lorakit.attach(model, LORA)
    return model


def test_unknown_names_and_options_are_refused_with_the_known_ones():
    with pytest.raises(lorakit.ConfigError,
                       match="optimizer='sgd' is invalid: one of adamw, adamw8bit, lora-pro, allora"):
        check_components(TrainConfig(optimizer="sgd"))
    with pytest.raises(lorakit.ConfigError, match="method='adalora' is invalid"):
        check_components(TrainConfig(method="adalora"))
    with pytest.raises(lorakit.ConfigError, match="regularizer='l2' is invalid: one of ba-lora"):
        check_components(TrainConfig(regularizer="l2"))
    with pytest.raises(lorakit.ConfigError, match="'allora_eta' is not read .* they read: dylora_frozen"):
        check_components(TrainConfig(method="dylora", options={"allora_eta": 2.0}))
    assert TrainConfig(optimizer="allora", options={"allora_eta": 2.0}).options == {"allora_eta": 2.0}


def built_optimizer(model, parameters, config: TrainConfig) -> torch.optim.Optimizer:
    [choice] = [c for c in components_for(config) if isinstance(c, OptimizerChoice)]
    return choice.optimizer(model, parameters, config)


def loop_hooks(config: TrainConfig) -> list:
    return [c for c in components_for(config) if not isinstance(c, OptimizerChoice)]


def test_the_registries_build_what_they_name():
    model = attached()
    parameters = list(lorakit.trainable_parameters(model).values())
    assert isinstance(built_optimizer(model, parameters, TrainConfig(optimizer="lora-pro")), LoraPro)
    allora = built_optimizer(model, parameters, TrainConfig(optimizer="allora", options={"allora_eta": 3.0}))
    assert isinstance(allora, Allora) and allora.param_groups[0]["eta"] == 3.0
    assert components_for(TrainConfig()) == []  # AdamW: the trainer's default
    [regularizer] = loop_hooks(TrainConfig(regularizer="ba-lora", options={"ba_lora_top_k": 5}))
    assert isinstance(regularizer, BaLoraRegularizer) and regularizer.weights.top_k == 5
    assert set(OPTIMIZERS) == {"adamw", "adamw8bit", "lora-pro", "allora"}
    assert set(METHODS) == {"lora", "dylora", "codyra", "mixlora", "l4q", "pat"}
    assert set(REGULARIZERS) == {"ba-lora"}


@pytest.mark.parametrize("init, changes, message", [
    ("lora-ga", {"method": "dylora"}, "init='lora-ga' does not combine with method='dylora'"),
    ("lora-ga", {"method": "codyra"}, "init='lora-ga' does not combine with method='codyra'"),
    ("kaiming", {"optimizer": "lora-pro", "method": "dylora"}, "optimizer='lora-pro' does not combine"),
    ("kaiming", {"optimizer": "lora-pro", "method": "codyra"}, "third factor"),
    ("kaiming", {"optimizer": "allora", "method": "dylora"}, "scaling-free"),
    ("kaiming", {"optimizer": "allora", "method": "codyra"}, "AdamW"),
    ("kaiming", {"optimizer": "lora-pro", "full": True}, "full fine-tuning cannot use optimizer='lora-pro'"),
    ("kaiming", {"method": "dylora", "full": True}, "full fine-tuning cannot use"),
    ("lq-lora", {"method": "l4q"}, "init='lq-lora' does not combine with method='l4q': L4Q quantizes"),
    ("loftq", {"method": "l4q"}, "init='loftq' does not combine with method='l4q'"),
    ("kaiming", {"optimizer": "lora-pro", "method": "l4q"}, "optimizer='lora-pro' does not combine"),
    ("kaiming", {"optimizer": "allora", "method": "l4q"}, "step sizes and offsets"),
    ("kaiming", {"regularizer": "ba-lora", "method": "l4q"}, "regularizer='ba-lora' does not combine"),
    ("kaiming", {"method": "l4q", "full": True}, "full fine-tuning cannot use"),
])
def test_refused_combinations_name_the_pair_and_the_reason(init, changes, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        check_combination(dataclasses.replace(LORA, init=init), TrainConfig(**changes))


def test_allora_refuses_dropout_and_the_allowed_combinations_pass():
    with pytest.raises(lorakit.ConfigError, match="dropout-free"):
        check_combination(dataclasses.replace(LORA, dropout=0.1), TrainConfig(optimizer="allora"))
    for init, changes in [("eva", {"method": "dylora"}), ("lora-ga", {"optimizer": "lora-pro"}),
                          ("lora-ga", {"regularizer": "ba-lora"}),
                          ("kaiming", {"full": True, "regularizer": "ba-lora"}), ("eva", {"optimizer": "allora"})]:
        check_combination(dataclasses.replace(LORA, init=init), TrainConfig(**changes))


def test_scaling_free_methods_get_unit_scales():
    lora = LoraConfig(rank=8, alpha=32, rank_pattern={"q_proj": 2}, targets=("q_proj", "v_proj"))
    free = scale_free(lora)
    assert free.scale_for("model.layers.0.self_attn.v_proj") == 1.0
    assert free.scale_for("model.layers.0.self_attn.q_proj") == 1.0
    assert scale_free(dataclasses.replace(lora, use_rslora=True)).scale_for("x.v_proj") == pytest.approx(1.0)
    assert prepared_lora(lora, TrainConfig(method="codyra")) == free
    assert prepared_lora(lora, TrainConfig(optimizer="lora-pro")) == lora


def test_the_ba_lora_term_uses_the_original_model_and_is_added_to_the_loss():
    model, tokenizer = attached(), char_tokenizer()
    from lorakit.data.batching import collate
    from lorakit.data.encoding import encode
    batch = collate([encode(e, tokenizer, chat=True, max_length=64) for e in copy_examples(3)], pad_id=0)
    from tests.helpers import perturb
    perturb(model, "default")
    regularizer = BaLoraRegularizer()
    regularizer.attach(model)
    outputs = supervised_outputs(model, batch)
    original = supervised_outputs(tiny_llama(), batch).logits  # the same base weights, no adapter
    torch.testing.assert_close(regularizer.reference_logits(batch), original.detach(), atol=1e-5, rtol=0)
    expected = ba_lora_terms(outputs.logits, original, rows=3)["total"]
    torch.testing.assert_close(regularizer.losses(batch, outputs)["ba_lora"], expected, atol=1e-6, rtol=1e-5)
    separate = BaLoraRegularizer(reference=tiny_llama())
    separate.attach(model)
    torch.testing.assert_close(separate.losses(batch, outputs)["ba_lora"], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("changes", [{"optimizer": "lora-pro"}, {"optimizer": "allora"}, {"optimizer": "adamw8bit"},
                                     {"regularizer": "ba-lora"}, {"method": "codyra"}, {"method": "dylora"}])
def test_every_component_resumes_exactly(tmp_path, monkeypatch, changes):
    tokenizer, examples = char_tokenizer(), copy_examples(24)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, save_every=3, seed=2, **changes)
    lora = prepared_lora(LORA, config)

    def fresh():
        model = tiny_llama()
        torch.manual_seed(0)
        lorakit.attach(model, lora)
        return model

    straight = fresh()
    train(straight, tokenizer, examples, config, out_dir=tmp_path / "a", progress=False)
    interrupted = fresh()
    run_interrupted(monkeypatch, 4, lambda: train(interrupted, tokenizer, examples, config,
                                                  out_dir=tmp_path / "b", progress=False))
    resumed = fresh()
    train(resumed, tokenizer, examples, config, out_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    expected, got = lorakit.trainable_parameters(straight), lorakit.trainable_parameters(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()


def test_the_regularizer_share_is_logged_apart_from_the_task_loss(tmp_path):
    import json
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, log_every=1, regularizer="ba-lora",
                         options={"ba_lora_consistency": 1.0})
    train(attached(), char_tokenizer(), copy_examples(8), config, out_dir=tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    # Diversity and SVD terms depend on the trained logits alone, so they are non-zero from the first step.
    assert all(line["extra_loss"] != 0.0 for line in lines)
    assert all(line["loss"] > 0 for line in lines)
