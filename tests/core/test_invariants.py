"""The layer invariants of DESIGN.md on a tiny random Llama (tolerances as PEFT's suite uses)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.layer import LoraLayer
from lorakit.core.state import lora_layers
from tests.helpers import logits, perturb, tiny_llama, token_batch

CONFIG = LoraConfig(rank=4, alpha=8, targets="all-linear")


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def ids():
    return token_batch()


def two_adapters(model):
    lorakit.attach(model, CONFIG, "a")
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "down_proj")), "b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    return model


def test_identity_at_init(model, ids):
    base = logits(model, ids)
    lorakit.attach(model, CONFIG)
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.adapters["default"].B) == 0
        assert torch.count_nonzero(layer.adapters["default"].A) > 0
    assert torch.equal(logits(model, ids), base)


def test_disabled_equals_base_and_restores(model, ids):
    base = logits(model, ids)
    two_adapters(model)
    lorakit.set_active(model, "a", "b")
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model, ids), adapted, atol=0, rtol=0)


def test_disabled_restores_after_an_exception(model, ids):
    two_adapters(model)
    adapted = logits(model, ids)
    with pytest.raises(RuntimeError), lorakit.disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), adapted)


def test_merge_equals_unmerged_equals_unmerge(model, ids):
    base = logits(model, ids)
    two_adapters(model)
    lorakit.set_active(model, "a", "b", weights=[0.7, -1.3])
    unmerged = logits(model, ids)
    lorakit.merge(model)
    assert lorakit.merged_adapters(model) == {"a": 0.7, "b": -1.3}
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    lorakit.merge(model)  # merging twice changes nothing
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    assert lorakit.merged_adapters(model) == {}
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merged_weights_are_base_plus_scaled_delta(model):
    lorakit.attach(model, CONFIG, "a")
    perturb(model, "a")
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    adapter = layer.adapters["a"]
    expected = before + 0.5 * (8 / 4) * adapter.B.detach() @ adapter.A.detach()
    lorakit.set_active(model, "a", weights=[0.5])
    lorakit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected, atol=1e-6, rtol=0)


def test_merge_and_unload_leaves_a_plain_model(model, ids):
    two_adapters(model)
    lorakit.set_active(model, "a")
    expected = logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not hasattr(plain, "lorakit_state")
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head", "q_proj"]])
def test_merging_into_tied_embeddings_changes_only_the_adapted_one_and_saves_both(targets, ids, tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=targets))
    perturb(model, "default")
    expected = logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight and not plain.config.tie_word_embeddings
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_of_an_inactive_adapter_uses_weight_one(model, ids):
    two_adapters(model)
    with lorakit.active(model, "b"):
        expected = logits(model, ids)
    lorakit.set_active(model, "a")
    plain = lorakit.merge_and_unload(model, names=["b"])
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_refuses_nan_and_changes_nothing(model, ids):
    two_adapters(model)
    lorakit.set_active(model, "a", "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["b"].B[0, 0] = float("nan")
    with pytest.raises(lorakit.StateError, match="'b'.*non-finite"):
        lorakit.merge(model)
    assert lorakit.merged_adapters(model) == {}
    for key, value in model.state_dict().items():
        if "adapters.b" not in key:
            assert torch.equal(value, before[key]), key


def test_merge_refuses_an_overflowing_result_and_rolls_back(model):
    lorakit.attach(model, CONFIG, "a")
    perturb(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.set_active(model, "a", weights=[1e39])
    with pytest.raises(lorakit.StateError, match="non-finite"):
        lorakit.merge(model)
    assert lorakit.merged_adapters(model) == {}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_switching_restores_exact_outputs(model, ids):
    two_adapters(model)
    lorakit.set_active(model, "a")
    out_a = logits(model, ids)
    lorakit.set_active(model, "b")
    out_b = logits(model, ids)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    lorakit.set_active(model, "a")
    assert torch.equal(logits(model, ids), out_a)
    with lorakit.active(model, "b"):
        assert torch.equal(logits(model, ids), out_b)
    assert torch.equal(logits(model, ids), out_a)


def test_several_active_adapters_are_the_weighted_sum_per_layer(model):
    two_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj  # holds both a and b
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        with lorakit.disabled(model):
            base = layer(x)
        outputs = {}
        for name in ("a", "b"):
            with lorakit.active(model, name):
                outputs[name] = layer(x) - base
        with lorakit.active(model, "a", "b", weights=[0.25, -2.0]):
            combined = layer(x) - base
    torch.testing.assert_close(combined, 0.25 * outputs["a"] - 2.0 * outputs["b"], atol=1e-6, rtol=1e-5)


def test_no_active_adapter_is_the_base(model, ids):
    base = logits(model, ids)
    two_adapters(model)
    lorakit.set_active(model)
    torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=0)


def test_mixed_batch_rows_equal_single_adapter_runs(model, ids):
    base = logits(model, ids)
    two_adapters(model)
    single = {}
    for name in ("a", "b"):
        with lorakit.active(model, name):
            single[name] = logits(model, ids)
    rows = ["b", None, "a"]
    mixed = logits(model, ids, adapter_per_row=rows)
    torch.testing.assert_close(mixed[0], single["b"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], single["a"][2], atol=1e-5, rtol=1e-5)
    # The per-row routing lasts for that call only.
    lorakit.set_active(model, "a")
    assert torch.equal(logits(model, ids), single["a"])


def test_mixed_batch_generation_equals_single_adapter_generation(model, ids):
    two_adapters(model)
    prompts = ids[:, :4]
    single = {}
    for name in ("a", "b"):
        with lorakit.active(model, name):
            single[name] = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with lorakit.disabled(model):
        base = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with lorakit.mixed_batch(model, ["a", "b", None]):
        mixed = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(mixed[0], single["a"][0])
    assert torch.equal(mixed[1], single["b"][1])
    assert torch.equal(mixed[2], base[2])


def test_mixed_batch_errors(model, ids):
    two_adapters(model)
    with pytest.raises(lorakit.AdapterError, match="'nope'"):
        model(ids, adapter_per_row=["a", "nope", None])
    with pytest.raises(lorakit.ConfigError, match="2 names for a batch of 3 rows"):
        model(ids, adapter_per_row=["a", "b"])
    lorakit.merge(model)
    with pytest.raises(lorakit.StateError, match="unmerge"):
        model(ids, adapter_per_row=["a", "b", None])
    lorakit.unmerge(model)
    with lorakit.mixed_batch(model, ["a", "b", None]):
        with pytest.raises(lorakit.StateError, match="mixed batch"):
            lorakit.merge(model)
    assert lorakit.merged_adapters(model) == {}


def test_disabled_takes_precedence_over_per_row(model, ids):
    base = logits(model, ids)
    two_adapters(model)
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, ids, adapter_per_row=["a", "b", "a"]), base, atol=1e-6, rtol=0)


def test_only_adapter_parameters_change_after_training(model, ids):
    lorakit.attach(model, CONFIG)
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = lorakit.trainable_parameters(model)
    assert trainable and all(".adapters.default." in n for n in trainable)
    adapter_before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.allclose(param, adapter_before[name], atol=1e-4), name
        else:
            assert param.grad is None, name
            assert torch.equal(param, base_before[name]), name


def test_delete_removes_every_trace(model, ids):
    original_keys = set(model.state_dict())
    base = logits(model, ids)
    two_adapters(model)
    lorakit.set_active(model, "a", "b")
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a"]
    assert lorakit.active_weights(model) == {"a": 1.0}
    assert not any(".adapters.b." in k for k in model.state_dict())
    with pytest.raises(lorakit.AdapterError, match="unknown adapter 'b'"):
        lorakit.set_active(model, "b")
    lorakit.delete_adapter(model, "a")
    assert set(model.state_dict()) == original_keys
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not hasattr(model, "lorakit_state")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, ids), base)


def test_delete_refuses_unknown_and_merged_adapters(model):
    two_adapters(model)
    with pytest.raises(lorakit.AdapterError, match="known adapters: \\['a', 'b'\\]"):
        lorakit.delete_adapter(model, "c")
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    with pytest.raises(lorakit.StateError, match="merged"):
        lorakit.delete_adapter(model, "a")
    assert lorakit.adapter_names(model) == ["a", "b"]


def test_attach_refuses_a_taken_or_bad_name(model):
    lorakit.attach(model, CONFIG, "a")
    with pytest.raises(lorakit.AdapterError, match="already exists"):
        lorakit.attach(model, CONFIG, "a")
    with pytest.raises(lorakit.AdapterError, match="invalid"):
        lorakit.attach(model, CONFIG, "x.y")
    assert lorakit.adapter_names(model) == ["a"]


def test_set_active_validates_weights(model):
    two_adapters(model)
    with pytest.raises(lorakit.ConfigError, match="1 entries for 2 adapters"):
        lorakit.set_active(model, "a", "b", weights=[1.0])
    with pytest.raises(lorakit.ConfigError, match="not a finite number"):
        lorakit.set_active(model, "a", weights=[float("nan")])


def test_an_adapter_on_a_skeleton_base_draws_the_factors_a_loaded_base_gets(model):
    from lorakit.models.skeleton import causal_lm_skeleton
    skeleton = causal_lm_skeleton(model.config)  # every weight on the meta device (sharded training fills it later)
    for target in (model, skeleton):
        torch.manual_seed(3)
        lorakit.attach(target, CONFIG)
    drawn = {name: p for name, p in skeleton.named_parameters() if p.requires_grad}
    assert drawn and all(p.device.type == "cpu" for p in drawn.values())
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(drawn[name], parameter), name
