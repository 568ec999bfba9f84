"""CoDyRA: gated ranks, the proximal schedule, exact pruning, saving, and the continual protocol."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.data.example import Example
from lorakit.jobs.continual import ContinualResult, train_continual
from lorakit.methods.codyra import CodyraSchedule, active_ranks, add_gates, prune_gates, soft_threshold_, threshold_at
from lorakit.train import train
from tests.helpers import char_tokenizer, copy_examples, logits, perturb, tiny_llama, token_batch

LORA = LoraConfig(rank=4, alpha=4, targets=("q_proj", "v_proj", "lm_head"))


def gated_model():
    model = tiny_llama()
    lorakit.attach(model, LORA)
    perturb(model, "default")
    add_gates(model)
    return model


def test_the_gates_scale_each_component():
    model = gated_model()
    layer = model.get_submodule("lm_head")
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.gate.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
    A, B = adapter.A.detach(), adapter.B.detach()
    expected = B @ torch.diag(adapter.gate.detach()) @ A
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-6, rtol=0)


def test_the_soft_threshold_shrinks_towards_zero_and_makes_exact_zeros():
    model = gated_model()
    gate = model.get_submodule("lm_head").adapters["default"].gate
    with torch.no_grad():
        gate.copy_(torch.tensor([0.3, -0.05, -0.5, 0.1]))
    soft_threshold_(model, 0.1)
    assert gate.tolist() == pytest.approx([0.2, 0.0, -0.4, 0.0])
    assert (gate == 0).sum() == 2


def test_the_threshold_is_zero_while_dense_then_rises_stepwise_to_max_kappa():
    values = [threshold_at(s, 100, max_kappa=0.01, dense_fraction=0.5, stages=5) for s in range(100)]
    assert values[:50] == [0.0] * 50
    assert values[50] == pytest.approx(0.01 / 4) and values[-1] == pytest.approx(0.01)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert sorted(set(values[50:])) == pytest.approx([0.0025, 0.005, 0.0075, 0.01])


def test_pruning_removes_exactly_the_zero_gated_components_and_keeps_the_output(tmp_path):
    model, ids = gated_model(), token_batch()
    with torch.no_grad():
        for _, layer in lorakit.core.state.lora_layers(model):
            layer.adapters["default"].gate[1] = 0.0
        model.get_submodule("lm_head").adapters["default"].gate[:] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    before = logits(model, ids)
    assert active_ranks(model)["lm_head"] == 1
    A_kept = (model.get_submodule("lm_head").adapters["default"].gated_A()[2:3]).detach().clone()
    ranks = prune_gates(model)
    assert ranks["lm_head"] == 1 and ranks["model.layers.0.self_attn.q_proj"] == 3
    adapter = model.get_submodule("lm_head").adapters["default"]
    assert adapter.gate is None and torch.equal(adapter.A.detach(), A_kept)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    lorakit.save_adapter(model, tmp_path)
    loaded = tiny_llama()
    lorakit.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(logits(loaded, ids), before, atol=1e-5, rtol=0)
    peft = pytest.importorskip("peft")
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), before,
                               atol=1e-5, rtol=0)


def test_an_unpruned_gated_adapter_saves_with_the_gates_folded_in(tmp_path):
    model, ids = gated_model(), token_batch()
    before = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    loaded = tiny_llama()
    lorakit.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(logits(loaded, ids), before, atol=1e-5, rtol=0)


def test_training_with_codyra_sparsifies_the_gates_and_saves_a_pruned_adapter(tmp_path):
    tokenizer, examples = char_tokenizer(), copy_examples(24)
    model = tiny_llama()
    lorakit.attach(model, LORA)
    config = TrainConfig(steps=20, batch_size=4, lr=1e-2, method="codyra", seed=1,
                         options={"codyra_max_kappa": 0.2, "codyra_stages": 5})
    zeros, last_active = [], {}
    real_after = CodyraSchedule.after_step

    def record(self, step, total):
        real_after(self, step, total)
        last_active.update(active_ranks(self.model))
        zeros.append(sum(4 - rank for rank in last_active.values()))

    CodyraSchedule.after_step = record
    try:
        train(model, tokenizer, examples, config, out_dir=tmp_path, progress=False)
    finally:
        CodyraSchedule.after_step = real_after
    assert zeros[:10] == [0] * 10 and zeros[-1] >= 10  # dense half, then the share of zero gates rises
    assert all(b >= a for a, b in zip(zeros, zeros[1:], strict=False))
    pruned = {m: a.rank for m, layer in lorakit.core.state.lora_layers(model) for a in layer.adapters.values()}
    assert pruned == {m: max(1, rank) for m, rank in last_active.items()}
    loaded = tiny_llama()
    lorakit.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(logits(loaded, token_batch()), logits(model, token_batch()), atol=1e-5, rtol=0)


def test_the_continual_table_and_its_summaries():
    result = ContinualResult(["a", "b", "c"], [[0.9, 0.1, 0.2], [0.8, 0.7, 0.3], [0.6, 0.5, 0.9]])
    summary = result.summary()
    assert summary["transfer"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert summary["average"] == pytest.approx(5.0 / 9)
    assert summary["last"] == pytest.approx(2.0 / 3)


def test_continual_training_merges_each_task_and_the_saved_adapters_add_up(tmp_path):
    tokenizer = char_tokenizer()
    tasks = [("copy", copy_examples(16)), ("upper", [Example(prompt=f"Up: {w}", completion=w.upper())
                                                      for w in ["ab", "cd", "ef", "abc", "fed", "bead"] * 2])]
    model = tiny_llama()
    original = tiny_llama()
    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, method="codyra", options={"codyra_max_kappa": 0.1})
    result = train_continual(model, tokenizer, tasks, LORA, config, out_dir=tmp_path, progress=False,
                             eval_sets={"copy": copy_examples(3, seed=5), "upper": tasks[1][1][:3]})
    assert len(result.accuracy) == 2 and all(len(row) == 2 for row in result.accuracy)
    assert getattr(model, "lorakit_state", None) is None  # every task is merged in; no adapter remains
    for name, _ in tasks:
        lorakit.load_adapter(original, tmp_path / name, name)
    lorakit.set_active(original, "copy", "upper")
    torch.testing.assert_close(logits(original, token_batch()), logits(model, token_batch()), atol=1e-4, rtol=0)
