"""DyLoRA: nested ranks, frozen mode, full rank equals LoRA, evaluation at every rank, export at a rank."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.eval.rank_sweep import evaluate_ranks
from lorakit.methods.dylora import DyLoraSampler, at_rank, max_rank, sample_rank, set_nested_rank, truncate_adapter
from lorakit.train import train
from tests.helpers import char_tokenizer, copy_examples, logits, perturb, tiny_llama, token_batch

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "lm_head"))


def perturbed(config: LoraConfig = LORA):
    model = tiny_llama()
    lorakit.attach(model, config)
    perturb(model, "default")
    return model


def test_full_rank_equals_lora_and_lower_ranks_equal_a_truncated_adapter():
    model, ids = perturbed(), token_batch()
    full = logits(model, ids)
    with at_rank(model, 4):
        torch.testing.assert_close(logits(model, ids), full, atol=0, rtol=0)
    with at_rank(model, 2):
        nested = logits(model, ids)
    # The same model with a rank-2 adapter holding the first two components, scale alpha / 2.
    reference = tiny_llama()
    lorakit.attach(reference, LoraConfig(rank=2, alpha=8, targets=("q_proj", "v_proj", "lm_head")))
    with torch.no_grad():
        for name, layer in lorakit.core.state.lora_layers(model):
            target = reference.get_submodule(name).adapters["default"]
            target.A.copy_(layer.adapters["default"].A[:2])
            target.B.copy_(layer.adapters["default"].B[:, :2])
    torch.testing.assert_close(nested, logits(reference, ids), atol=1e-6, rtol=0)
    assert not torch.allclose(nested, full)
    torch.testing.assert_close(logits(model, ids), full, atol=0, rtol=0)  # the block restored the full rank


def test_rslora_scale_at_a_nested_rank_is_alpha_over_sqrt_b():
    model = perturbed(LoraConfig(rank=4, alpha=8, use_rslora=True, targets=("q_proj",)))
    adapter = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    set_nested_rank(model, 1)
    assert adapter.factors()[2] == pytest.approx(8.0)
    set_nested_rank(model, None)
    assert adapter.factors()[2] == pytest.approx(8 / 2)


def frozen_gradients(frozen: bool):
    model = perturbed()
    set_nested_rank(model, 3, frozen=frozen)
    model(token_batch()).logits.sum().backward()
    adapter = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    return adapter.A.grad, adapter.B.grad


def test_frozen_mode_trains_only_component_b_and_nested_mode_trains_all_b():
    grad_a, grad_b = frozen_gradients(frozen=True)
    assert torch.count_nonzero(grad_a[:2]) == 0 and torch.count_nonzero(grad_b[:, :2]) == 0
    assert torch.count_nonzero(grad_a[2]) > 0 and torch.count_nonzero(grad_a[3]) == 0
    grad_a, grad_b = frozen_gradients(frozen=False)
    assert all(torch.count_nonzero(grad_a[i]) > 0 for i in range(3)) and torch.count_nonzero(grad_a[3]) == 0
    assert torch.count_nonzero(grad_b[:, 3]) == 0


def test_sampled_ranks_are_uniform_reproducible_and_in_range():
    draws = [sample_rank(seed=5, step=s, rank=4) for s in range(2000)]
    assert draws[:50] == [sample_rank(seed=5, step=s, rank=4) for s in range(50)]
    assert set(draws) == {1, 2, 3, 4}
    assert all(abs(draws.count(b) / 2000 - 0.25) < 0.04 for b in range(1, 5))


def test_the_sampler_sets_the_rank_for_the_step_only():
    model = perturbed()
    sampler = DyLoraSampler(seed=1)
    sampler.attach(model)
    adapter = model.get_submodule("lm_head").adapters["default"]
    sampler.before_step(7, 10)
    assert adapter.nested.rank == sample_rank(1, 7, 4)
    sampler.after_step(7, 10)
    assert adapter.nested is None and max_rank(model) == 4


def test_a_merged_model_refuses_a_rank_change():
    model = perturbed()
    lorakit.merge(model)
    with pytest.raises(lorakit.StateError, match="unmerge"):
        set_nested_rank(model, 2)


def test_a_dylora_run_trains_only_the_components_of_the_ranks_it_drew():
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=2, method="dylora")
    drawn = [sample_rank(2, step, 4) for step in range(3)]
    assert max(drawn) < 4  # seed 2 draws no full-rank step in 3 steps, so the last component must stay put
    model = tiny_llama()
    lorakit.attach(model, LORA)
    train(model, char_tokenizer(), copy_examples(24), config, progress=False)
    B = model.get_submodule("lm_head").adapters["default"].B  # B starts at 0: non-zero columns were trained
    assert torch.count_nonzero(B[:, :max(drawn)]) > 0 and torch.count_nonzero(B[:, max(drawn):]) == 0


def test_truncated_export_reloads_as_the_adapter_at_that_rank(tmp_path):
    model, ids = perturbed(LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "lm_head"),
                                      rank_pattern={"lm_head": 2})), token_batch()
    lorakit.save_adapter(model, tmp_path / "full")
    with at_rank(model, 3):
        expected = logits(model, ids)
    truncate_adapter(tmp_path / "full", 3, tmp_path / "r3")
    loaded = tiny_llama()
    lorakit.load_adapter(loaded, tmp_path / "r3")
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    assert loaded.get_submodule("lm_head").adapters["default"].rank == 2  # the pattern's rank was already lower
    with pytest.raises(lorakit.ConfigError, match=r"\[1, 4\]"):
        truncate_adapter(tmp_path / "full", 5, tmp_path / "r5")
    assert not (tmp_path / "r5").exists()


def test_truncated_export_loads_in_peft_identically(tmp_path):
    peft = pytest.importorskip("peft")
    model, ids = perturbed(), token_batch()
    lorakit.save_adapter(model, tmp_path / "full")
    truncate_adapter(tmp_path / "full", 2, tmp_path / "r2")
    with at_rank(model, 2):
        expected = logits(model, ids)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "r2")
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-5, rtol=0)


def test_evaluating_every_rank_gives_one_result_per_rank():
    model = perturbed()
    examples = copy_examples(4)
    results = evaluate_ranks(model, char_tokenizer(), examples, max_new_tokens=4)
    assert sorted(results) == [1, 2, 3, 4]
    losses = {rank: result.loss for rank, result in results.items()}
    assert len(set(losses.values())) == 4  # each rank is a different model
    with at_rank(model, 2):
        assert lorakit.eval.exact_match.evaluate(model, char_tokenizer(), examples, max_new_tokens=4).loss == \
            pytest.approx(losses[2])
