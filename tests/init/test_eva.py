"""EVA: incremental PCA, rank redistribution, convergence, grouping, masks, storage and PEFT parity."""

from __future__ import annotations

import itertools
from dataclasses import replace

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.core.state import lora_layers
from lorakit.errors import AdapterError, ConfigError, FormatError, TargetError
from lorakit.init.eva import estimate_eva, eva_config, init_eva
from lorakit.init.eva.estimate import TENSORS_FILE, EvaEstimate, EvaModule
from lorakit.init.eva.incremental_pca import IncrementalPCA, sign_of_largest
from lorakit.init.eva.ranks import redistribute
from tests.helpers import logits, tiny_llama, token_batch

CONFIG = LoraConfig(rank=4, alpha=8)


def lm_batches(count: int, seed: int = 0, rows: int = 4, length: int = 24):
    """Right-padded LM batches: row 0 has 5 padding positions, every row's last 3 real tokens are unsupervised."""
    for index in range(count):
        ids = token_batch(rows, length, seed=seed + index)
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[1:, -3:] = -100
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def estimate() -> EvaEstimate:
    return estimate_eva(tiny_llama(), lm_batches(40), CONFIG, progress=False)


def full_pca(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: sign-fixed principal directions (rows) and explained-variance ratios of all of X."""
    _, S, Vt = torch.linalg.svd(X - X.mean(dim=0), full_matrices=False)
    return Vt * sign_of_largest(Vt)[:, None], S.square() / S.square().sum()


def assert_same_up_to_sign(rows: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    signs = torch.sign((rows * expected).sum(dim=1, keepdim=True))
    torch.testing.assert_close(rows * signs, expected, atol=atol, rtol=0)


def test_incremental_pca_keeping_every_component_equals_full_pca():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=generator, dtype=torch.float64) @ torch.randn(12, 12, generator=generator,
                                                                                   dtype=torch.float64) + 3.0
    pca = IncrementalPCA(12)
    for batch in X.split(40):
        pca.partial_fit(batch)
    components, ratios = full_pca(X)
    assert_same_up_to_sign(pca.components, components, atol=1e-10)
    torch.testing.assert_close(pca.explained_variance_ratio, ratios, atol=1e-12, rtol=0)
    torch.testing.assert_close(pca.mean, X.mean(dim=0))
    assert pca.n_seen == 300


def test_incremental_pca_top_components_match_full_pca_and_leave_the_random_state_alone():
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    codes = torch.randn(2000, 4, generator=generator) * torch.tensor([8.0, 5.0, 3.0, 2.0])
    X = codes @ basis[:, :4].T + 0.1 * torch.randn(2000, 32, generator=generator) + 1.0
    torch.manual_seed(123)
    pca = IncrementalPCA(4)
    for batch in X.split(100):
        pca.partial_fit(batch)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    components, ratios = full_pca(X)
    assert_same_up_to_sign(pca.components, components[:4], atol=1e-4)
    torch.testing.assert_close(pca.explained_variance_ratio, ratios[:4], atol=1e-4, rtol=0)


def test_budget_is_kept_rows_are_orthonormal_and_logits_unchanged(estimate):
    assert sum(estimate.ranks.values()) == estimate.budget == 14 * CONFIG.rank
    assert len(set(estimate.ranks.values())) > 1  # the budget really moved
    assert all(rank <= 2 * CONFIG.rank for rank in estimate.ranks.values())
    model, ids = tiny_llama(), token_batch(2, 16, seed=99)
    before = logits(model, ids)
    lorakit.attach(model, eva_config(CONFIG, estimate))
    init_eva(model, estimate)
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
    for name, layer in lora_layers(model):
        A = layer.adapters["default"].A
        assert A.shape[0] == estimate.ranks[name]
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), atol=1e-5, rtol=0)
        assert not layer.adapters["default"].B.any()
    lorakit.attach(model, eva_config(CONFIG, estimate), "white")
    init_eva(model, estimate, "white", whiten=True)
    for name, layer in lora_layers(model):
        norms = layer.adapters["white"].A.norm(dim=1)
        torch.testing.assert_close(norms, estimate.modules[name].singular_values.rsqrt(), rtol=1e-5, atol=0)


class TwoInputs(nn.Module):
    """Two linear layers, one fed inputs of effective dimension 1, the other isotropic inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat = nn.Linear(16, 8)
        self.round = nn.Linear(16, 8)

    def forward(self, low: torch.Tensor, high: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.flat(low) + self.round(high)


def two_input_batches(count: int):
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=generator)
    for _ in range(count):
        noise = 1e-3 * torch.randn(2, 32, 16, generator=generator)
        low = torch.randn(2, 32, 1, generator=generator) * direction + noise  # effective dimension 1
        yield {"low": low, "high": torch.randn(2, 32, 16, generator=generator), "attention_mask": torch.ones(2, 32)}


def test_rank_moves_from_the_low_dimensional_layer_to_the_isotropic_one():
    config = LoraConfig(rank=4, alpha=4, targets=("flat", "round"))
    result = estimate_eva(TwoInputs(), two_input_batches(30), config, tau=0.9, progress=False)
    assert result.ranks == {"flat": 1, "round": 7}
    same = estimate_eva(TwoInputs(), two_input_batches(30), config, rho=1.0, tau=0.9, progress=False)
    assert same.ranks == {"flat": 4, "round": 4}


def test_redistribute_keeps_the_largest_ratios_as_prefixes():
    ratios = {"a": torch.tensor([0.5, 0.1, 0.05]), "b": torch.tensor([0.3, 0.2, 0.01]), "c": torch.tensor([0.04])}
    assert redistribute(ratios, 3) == {"a": 1, "b": 2, "c": 0}
    assert redistribute(ratios, 7) == {"a": 3, "b": 3, "c": 1}


def test_convergence_stops_early_on_stationary_data():
    pulled = []

    def same_batch():
        batch = next(lm_batches(1))
        while True:
            pulled.append(1)
            yield batch

    result = estimate_eva(tiny_llama(), same_batch(), CONFIG, progress=False)
    assert result.batches == 2 and len(pulled) == 2  # the second step confirms the first; no batch more is read
    assert result.not_converged == []
    strict = estimate_eva(tiny_llama(), lm_batches(50), CONFIG, tau=0.999999, max_batches=3, progress=False)
    assert strict.batches == 3
    assert strict.not_converged  # reported, not raised
    assert sum(strict.ranks.values()) == strict.budget


def test_layers_with_equal_inputs_share_one_pca(monkeypatch):
    fits = []
    real = IncrementalPCA.partial_fit
    monkeypatch.setattr(IncrementalPCA, "partial_fit", lambda self, X: fits.append(self) or real(self, X))
    result = estimate_eva(tiny_llama(), lm_batches(1), CONFIG, progress=False)
    assert len(fits) == 2 * 4  # per decoder layer: q/k/v, o, gate/up, down
    groups = {name: module.group for name, module in result.modules.items()}
    assert groups["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert groups["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert groups["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj"
    q, k = result.modules["model.layers.0.self_attn.q_proj"], result.modules["model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(q.explained_variance_ratio, k.explained_variance_ratio, atol=0, rtol=0)


def rewrite(batches, positions):
    """The same batches with other token ids wherever ``positions(batch)`` is true."""
    for batch in batches:
        ids = batch["input_ids"].clone()
        where = positions(batch)
        ids[where] = (ids[where] + 17) % 128
        yield {**batch, "input_ids": ids}


def assert_same_estimate(first: EvaEstimate, second: EvaEstimate, same: bool = True) -> None:
    equal = all(torch.allclose(first.modules[n].components, second.modules[n].components, atol=1e-5)
                and first.ranks[n] == second.ranks[n] for n in first.modules)
    assert equal is same


def test_padded_and_unsupervised_tokens_are_ignored():
    def run(batches, **kw):
        return estimate_eva(tiny_llama(), batches, CONFIG, max_batches=4, progress=False, **kw)

    def padded(b):
        return b["attention_mask"] == 0

    def unsupervised(b):
        return (b["labels"] == -100) & (b["attention_mask"] == 1)

    unlabelled = run(lm_batches(4), use_label_mask=False)  # only the attention mask selects tokens
    assert_same_estimate(unlabelled, run(rewrite(lm_batches(4), padded), use_label_mask=False))
    assert_same_estimate(unlabelled, run(rewrite(lm_batches(4), unsupervised), use_label_mask=False), same=False)
    labelled = run(lm_batches(4))
    assert_same_estimate(labelled, run(rewrite(lm_batches(4), unsupervised)))


def test_estimate_save_load_round_trip(estimate, tmp_path):
    estimate.save(tmp_path / "eva")
    loaded = EvaEstimate.load(tmp_path / "eva")
    assert (loaded.ranks, loaded.batches, loaded.rho, loaded.tau) == (estimate.ranks, estimate.batches, 2.0, 0.99)
    for name, module in estimate.modules.items():
        other = loaded.modules[name]
        assert (other.base_rank, other.converged, other.group) == (module.base_rank, module.converged, module.group)
        for key in ("components", "singular_values", "explained_variance_ratio"):
            assert torch.equal(getattr(other, key), getattr(module, key))
    (tmp_path / "eva" / TENSORS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(FormatError, match=TENSORS_FILE):
        EvaEstimate.load(tmp_path / "eva")


def test_saved_eva_adapter_reloads_identically_in_peft_and_lorakit(estimate, tmp_path):
    assert 0 in estimate.ranks.values()  # so a module is excluded, too
    ids, expected_ranks = token_batch(), {n: r for n, r in estimate.ranks.items() if r > 0}
    model = lorakit.attach(tiny_llama(), eva_config(CONFIG, estimate))
    init_eva(model, estimate)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            B = layer.adapters["default"].B
            B.copy_(0.2 * torch.randn(B.shape, generator=generator))
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(tiny_llama(), ids), atol=1e-3)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=1e-5)
    peft_ranks = {name.removeprefix("base_model.model."): module.lora_A["default"].weight.shape[0]
                  for name, module in theirs.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert peft_ranks == expected_ranks
    ours = tiny_llama()
    lorakit.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    assert {name: layer.adapters["default"].rank for name, layer in lora_layers(ours)} == expected_ranks


def test_init_eva_refuses_an_adapter_that_does_not_fit_the_estimate(estimate):
    model = lorakit.attach(tiny_llama(), LoraConfig(rank=4, alpha=8, targets=("q_proj", "embed_tokens")))
    with pytest.raises(AdapterError, match="model.embed_tokens"):
        init_eva(model, estimate)
    lorakit.attach(model, CONFIG, "plain")
    with pytest.raises(AdapterError, match="shape"):
        init_eva(model, estimate, "plain")


def _module(rank: int, base_rank: int = 4) -> EvaModule:
    return EvaModule(components=torch.zeros(rank, 8), singular_values=torch.ones(rank),
                     explained_variance_ratio=torch.zeros(8), base_rank=base_rank, converged=True, group="x")


def test_eva_config_patterns_and_exclusions():
    estimate = EvaEstimate({"m.a": _module(6), "m.b": _module(2, base_rank=3), "m.c": _module(0), "m.d": _module(4)},
                           batches=1, rho=2.0, tau=0.99)
    config = eva_config(LoraConfig(rank=4, alpha=8, rank_pattern={"b": 3}, alpha_pattern={"a": 2}), estimate)
    assert config.rank_pattern == {r"^m\.a": 6, r"^m\.b": 2}  # the old patterns are applied and replaced
    assert config.alpha_pattern == {r"^m\.a": 3.0, r"^m\.b": 8 * 2 / 3}
    assert config.exclude == ("m.c",)
    assert [config.rank_for(n) for n in ("m.a", "m.b", "m.d")] == [6, 2, 4]
    plain = LoraConfig(rank=4, alpha=8, rank_pattern={"b": 3})
    assert eva_config(plain, estimate, adjust_scaling_factors=False).alpha_pattern == {}
    assert eva_config(replace(plain, exclude=("z",)), estimate).exclude == ("z", "m.c")
    regex = eva_config(replace(plain, exclude=r".*\.z"), estimate).exclude
    assert regex == r"(?:.*\.z)|m\.c"
    with pytest.raises(ConfigError, match="rank 4 for module 'm.a'"):
        eva_config(LoraConfig(rank=8), estimate)


def test_bad_settings_and_targets_are_refused():
    with pytest.raises(ConfigError, match="rho"):
        estimate_eva(tiny_llama(), lm_batches(1), CONFIG, rho=0.5)
    with pytest.raises(TargetError, match="embed_tokens"):
        estimate_eva(tiny_llama(), lm_batches(1), LoraConfig(targets=("embed_tokens",)))
    with pytest.raises(lorakit.DataError, match="at least one batch"):
        estimate_eva(tiny_llama(), [], CONFIG)
    def hooks(model):
        return sum(len(m._forward_pre_hooks) for m in model.modules())

    model = tiny_llama()
    with pytest.raises(lorakit.DataError, match="tokens"):
        estimate_eva(model, itertools.repeat({"input_ids": token_batch(1, 4)}, 3), CONFIG, progress=False)
    assert hooks(model) == 0
