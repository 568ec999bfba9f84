"""MixLoRA on the core layer: identity at init, one-hot and sparse/dense routing, the aux loss, training,
saving, unsupported FFNs, cached generation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, FormatError, StateError, TargetError
from lorakit.config import TrainConfig
from lorakit.core.records import recording
from lorakit.io.files import load_tensors, save_tensors
from lorakit.mixtures.mixlora import (
    MixLoraConfig,
    MixLoraTraining,
    attach_mixlora,
    load_balancing_loss,
    load_mixlora,
    mixlora_layers,
    save_mixlora,
)
from lorakit.mixtures.mixlora.ffn import ROUTER_LOGITS
from lorakit.mixtures.mixlora.storage import ROUTERS_FILE, saved_folder
from lorakit.train import train
from tests.helpers import char_tokenizer, copy_examples, logits, perturb, tiny_gpt2, tiny_llama, token_batch

CONFIG = MixLoraConfig(num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0)


def mixlora(config: MixLoraConfig = CONFIG, *, trained: bool = True):
    """A tiny Llama made MixLoRA; ``trained``: non-zero adapters and routers that prefer different experts."""
    model = tiny_llama()
    ffns = attach_mixlora(model, config)
    if trained:
        for index, name in enumerate(["attention"] + [f"expert{i}" for i in range(config.num_experts)]):
            perturb(model, name, seed=index)
        with torch.no_grad():
            for index, ffn in enumerate(ffns):
                ffn.router.weight.copy_(torch.randn(ffn.router.weight.shape,
                                                    generator=torch.Generator().manual_seed(100 + index)))
    return model, ffns


class FixedRouter(nn.Module):
    """A router stand-in that sends every token to expert ``winner``."""

    def __init__(self, num_experts: int, winner: int) -> None:
        super().__init__()
        self.num_experts, self.winner = num_experts, winner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.num_experts)
        out[..., self.winner] = 10.0
        return out


def test_at_init_the_model_is_the_base_model():
    model, ffns = mixlora(trained=False)
    ids = token_batch()
    assert len(ffns) == 2
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), atol=1e-6, rtol=0)


def test_one_hot_routing_is_the_plain_adapter():
    model, ffns = mixlora(MixLoraConfig(num_experts=3, top_k=1, rank=4, alpha=8, dropout=0.0))
    for ffn in ffns:
        ffn.router = FixedRouter(3, winner=1)
    plain = tiny_llama()
    lorakit.attach(plain, lorakit.LoraConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
                   "attention")
    lorakit.attach(plain, lorakit.LoraConfig(rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj")),
                   "expert1", activate=False)
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)  # same module paths in both
    assert not missing
    lorakit.set_active(plain, "attention", "expert1")
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), atol=1e-5, rtol=0)
    lorakit.set_active(plain, "attention")  # the expert does change the output
    assert (logits(model, ids) - logits(plain, ids)).abs().max() > 1e-3


def test_sparse_equals_dense_and_uses_several_experts():
    model, ffns = mixlora()
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for ffn in ffns:
            with recording() as records:
                torch.testing.assert_close(ffn(x), ffn.dense_forward(x), atol=1e-5, rtol=0)
            sparse_logits, dense_logits = records[ROUTER_LOGITS]
            torch.testing.assert_close(sparse_logits, dense_logits)
            chosen = sparse_logits.topk(2, dim=-1).indices
            assert len(chosen.unique()) == 4


def test_mixture_changes_with_the_routing():
    model, ffns = mixlora()
    ids = token_batch()
    before = logits(model, ids)
    with torch.no_grad():
        ffns[0].router.weight.neg_()
    assert (logits(model, ids) - before).abs().max() > 1e-3


def cyclic_logits(num_experts: int) -> torch.Tensor:
    """Tokens whose logits are the cyclic shifts of one vector: f and P are exactly uniform."""
    base = torch.tensor([3.0, 1.0, 0.5, -2.0])[:num_experts]
    return torch.stack([base.roll(i) for i in range(num_experts)])


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_aux_loss_of_uniform_routing_is_k(top_k):
    uniform = cyclic_logits(4)
    assert load_balancing_loss([uniform, uniform.flip(0)], top_k).item() == pytest.approx(top_k, abs=1e-6)
    skewed = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 4)
    assert load_balancing_loss([skewed], top_k).item() > top_k + 0.5


def test_aux_loss_by_hand_with_padding():
    three = torch.log(torch.tensor(3.0))
    # probs: (0.75, 0.25), (0.75, 0.25), (0.25, 0.75); top-1 choices 0, 0, 1
    layer = torch.tensor([[[three, 0.0], [three, 0.0], [0.0, three]]])  # (B=1, T=3, E=2)
    f, P = (2 / 3, 1 / 3), (1.75 / 3, 1.25 / 3)
    assert load_balancing_loss([layer], 1).item() == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), abs=1e-6)
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: f = (1, 0), P = (0.75, 0.25)
    assert load_balancing_loss([layer], 1, mask).item() == pytest.approx(2 * 0.75, abs=1e-6)
    # top-2 of 2: slot 1 takes the other expert: sum = f0.P + f1.P = 1 * (0.75 + 0.25) over masked tokens
    assert load_balancing_loss([layer], 2, mask).item() == pytest.approx(2 * 1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="mask"):
        load_balancing_loss([layer], 1, torch.ones(1, 4))


def aux_term(model, batch, records, coefficient=None) -> torch.Tensor:
    component = MixLoraTraining(coefficient)
    component.attach(model)
    return component.losses(batch, SimpleNamespace(records=records))["mixlora_aux"]


def test_the_aux_term_uses_the_forward_s_records_and_the_mask():
    model, ffns = mixlora()
    with pytest.raises(StateError, match="recorded router logits of 0 MixLoRA FFNs"):
        aux_term(model, {}, {})
    with torch.no_grad():
        for ffn in ffns:
            ffn.router.weight.zero_()  # uniform p: L_aux = k whatever the ties pick
    ids = token_batch()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with recording() as records:
        model(ids)
    assert aux_term(model, batch, records).item() == pytest.approx(CONFIG.aux_loss_coefficient * 2, rel=1e-5)
    assert aux_term(model, batch, records, coefficient=0.5).item() == pytest.approx(1.0, rel=1e-5)
    model, ffns = mixlora()
    with recording() as records:
        model(ids)
    batch["attention_mask"][:, 5:] = 0
    expected = load_balancing_loss([logits[:, :5] for logits in records[ROUTER_LOGITS]], 2)
    torch.testing.assert_close(aux_term(model, batch, records), 0.001 * expected)


def test_a_forward_outside_a_recording_keeps_nothing():
    model, ffns = mixlora()
    model(token_batch())
    assert all("router_logits" not in vars(ffn) for ffn in ffns)
    with recording() as records:
        pass
    assert records == {}


def test_method_mixlora_refuses_a_model_without_mixlora_ffns():
    with pytest.raises(ConfigError, match="no MixLoRA FFN"):
        MixLoraTraining().attach(tiny_llama())


def test_gradients_reach_routers_attention_and_experts_only():
    model, ffns = mixlora(MixLoraConfig(num_experts=4, top_k=2, rank=4, alpha=8, jitter_noise=0.1))
    model.train()
    ids = token_batch()
    with recording() as records:
        out = model(ids, labels=ids)
    (out.loss + aux_term(model, {"input_ids": ids}, records)).backward()
    trainable = lorakit.trainable_parameters(model)
    assert {n for n in trainable if "router" in n} == {f"model.layers.{i}.mlp.router.weight" for i in range(2)}
    assert any(".self_attn.q_proj.adapters.attention.A" in n for n in trainable)
    assert len(trainable) == 2 + 2 * 4 * 2 + 2 * 3 * 4 * 2  # routers, attention A/B, experts A/B
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_method_mixlora_trains_with_its_load_balancing_loss():
    model, ffns = mixlora(trained=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    routers = [ffn.router.weight.detach().clone() for ffn in ffns]
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, log_every=1, method="mixlora")
    result = train(model, char_tokenizer(), copy_examples(8), config, progress=False)
    assert result.steps == 3 and math.isfinite(result.train_loss)
    terms = [line["mixlora_aux"] for line in result.metrics if "loss" in line]
    assert terms == pytest.approx([0.001 * 2] * 3, rel=0.2)  # c * L_aux, and L_aux ~ k for near-uniform routers
    assert [line["extra_loss"] for line in result.metrics if "loss" in line] == terms
    assert all(not torch.equal(r, ffn.router.weight) for r, ffn in zip(routers, ffns, strict=True))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_save_and_load_restore_the_model(tmp_path):
    model, _ = mixlora()
    ids = token_batch()
    expected = logits(model, ids)
    save_mixlora(model, tmp_path / "mix")
    folder = saved_folder(tmp_path / "mix")
    assert sorted(p.name for p in (tmp_path / "mix").iterdir()) == sorted(
        [folder.name, "lorakit.json", "mixlora_config.json"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["attention", "expert0", "expert1", "expert2", "expert3", "routers.safetensors"])
    fresh = tiny_llama()
    ffns = load_mixlora(fresh, tmp_path / "mix")
    assert len(ffns) == 2 and not lorakit.trainable_parameters(fresh)
    assert torch.equal(logits(fresh, ids), expected)
    assert lorakit.active_weights(fresh) == {"attention": 1.0}


def test_an_interrupted_save_leaves_the_previous_save_loading(tmp_path, monkeypatch):
    from lorakit.mixtures.mixlora import storage
    model, _ = mixlora()
    ids = token_batch()
    first = logits(model, ids)
    save_mixlora(model, tmp_path / "mix")
    perturb(model, "expert1", seed=9)
    real_save = storage.save_adapter

    def fail_on_expert2(model, path, name):
        if name == "expert2":
            raise OSError("disk full")
        return real_save(model, path, name)

    monkeypatch.setattr(storage, "save_adapter", fail_on_expert2)
    with pytest.raises(OSError, match="disk full"):
        save_mixlora(model, tmp_path / "mix")
    monkeypatch.undo()
    fresh = tiny_llama()
    load_mixlora(fresh, tmp_path / "mix")
    assert torch.equal(logits(fresh, ids), first)
    save_mixlora(model, tmp_path / "mix")  # the next save commits and clears both older folders
    assert len([p for p in (tmp_path / "mix").iterdir() if p.is_dir()]) == 1
    again = tiny_llama()
    load_mixlora(again, tmp_path / "mix")
    assert torch.equal(logits(again, ids), logits(model, ids)) and not torch.equal(logits(again, ids), first)


def test_loading_refuses_bad_routers_and_changes_nothing(tmp_path):
    model, _ = mixlora()
    directory = save_mixlora(model, tmp_path / "mix")
    routers = load_tensors(saved_folder(directory) / ROUTERS_FILE)
    key = "model.layers.0.mlp.router.weight"
    save_tensors(saved_folder(directory) / ROUTERS_FILE, {**routers, key: routers[key][:3]})
    fresh = tiny_llama()
    with pytest.raises(FormatError, match="router.weight has shape"):
        load_mixlora(fresh, directory)
    (saved_folder(directory) / ROUTERS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(FormatError, match="routers.safetensors"):
        load_mixlora(fresh, directory)
    (saved_folder(directory) / ROUTERS_FILE).unlink()
    with pytest.raises(FormatError, match="no such file"):
        load_mixlora(fresh, directory)
    assert lorakit.adapter_names(fresh) == [] and not mixlora_layers_or_none(fresh)


def mixlora_layers_or_none(model):
    try:
        return mixlora_layers(model)
    except StateError:
        return None


def test_loading_rolls_back_when_an_expert_is_broken(tmp_path):
    model, _ = mixlora()
    directory = save_mixlora(model, tmp_path / "mix")
    (saved_folder(directory) / "expert2" / "adapter_model.safetensors").write_bytes(b"broken")
    fresh = tiny_llama()
    with pytest.raises(FormatError, match="expert2"):
        load_mixlora(fresh, directory)
    assert lorakit.adapter_names(fresh) == []


def tiny(family: str):
    """A tiny randomly initialised causal LM of another family (hidden 32, 2 layers)."""
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", ["Mistral", "Qwen2"])
def test_other_gated_families_are_found_by_structure(family):
    model = tiny(family)
    ids = token_batch()
    expected = logits(model, ids)
    ffns = attach_mixlora(model, CONFIG)
    assert len(ffns) == 2
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)


def test_unsupported_ffns_are_named():
    with pytest.raises(TargetError, match=r"transformer\.h\.0\.mlp \(GPT2MLP.*c_fc.*gate_proj"):
        attach_mixlora(tiny_gpt2(), CONFIG)
    with pytest.raises(TargetError, match=r"model\.layers\.0\.mlp \(Phi3MLP.*gate_up_proj"):
        attach_mixlora(tiny("Phi3"), CONFIG)


def test_ffn_with_the_projections_but_another_forward_is_refused():
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.up_proj(x)) * mlp.gate_proj(x))
    with pytest.raises(TargetError, match=r"model\.layers\.1\.mlp \(LlamaMLP.*forward is not"):
        attach_mixlora(model, CONFIG)
    assert lorakit.adapter_names(model) == []


def test_config_is_validated():
    with pytest.raises(ConfigError, match=r"top_k=5 is invalid: an integer in \[1, num_experts=4\]"):
        MixLoraConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="attention_targets"):
        MixLoraConfig(attention_targets=["q_proj"])
    assert MixLoraConfig().aux_loss_coefficient == 0.001 and MixLoraConfig().num_experts == 8


def test_disabled_is_the_base_model_and_attach_twice_is_refused():
    model, _ = mixlora()
    ids = token_batch()
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), atol=1e-6, rtol=0)
    with pytest.raises(StateError, match="already"):
        attach_mixlora(model, CONFIG)


def test_jitter_only_in_training():
    ids = token_batch()
    model, _ = mixlora(MixLoraConfig(num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0, jitter_noise=0.2))
    plain, _ = mixlora()
    assert torch.equal(logits(model, ids), logits(plain, ids))
    model.train()
    assert (logits(model, ids) - logits(model, ids)).abs().max() > 1e-4


def test_cached_generation_equals_recomputation():
    model, _ = mixlora()
    prompt = token_batch(rows=1, length=5)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(6):
            step = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    assert torch.equal(generated, ids)
