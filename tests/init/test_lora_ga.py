"""LoRA-GA: the gradient estimate, the SVD factors, the offset that keeps the model unchanged, and the
rank-2r export that reproduces the trained model on the original base (lorakit and peft)."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.state import model_state
from lorakit.data.batching import collate
from lorakit.data.encoding import encode
from lorakit.data.example import Example
from lorakit.init.lora_ga import (
    GradientEstimate,
    LoraGaInit,
    estimate_gradients,
    init_lora_ga,
    offset_base,
    restore_base,
    save_lora_ga_adapter,
)
from lorakit.init.lora_ga.svd_factors import lora_ga_factors
from lorakit.io.files import save_tensors
from lorakit.models.supervised_loss import summed_loss, supervised_tokens
from lorakit.quant import NFConfig, quantize_model
from tests.helpers import char_tokenizer, logits, tiny_gpt2, tiny_llama, token_batch

ATTENTION = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    tokenizer = char_tokenizer()
    pairs = [(1, 2), (3, 4), (10, 5), (7, 8)]
    examples = [Example(prompt=f"Add {a} and {b}.", completion=str(a + b)) for a, b in pairs]
    encoded = [encode(e, tokenizer, chat=True, max_length=64) for e in examples]
    return [collate(encoded[:2], pad_id=0), collate(encoded[2:], pad_id=0)]


@pytest.fixture(scope="module")
def llama_grads(batches) -> GradientEstimate:
    return estimate_gradients(tiny_llama(), batches, targets=LoraConfig(targets="all-linear"), progress=False)


def manual_grads(model, batch, names: list[str]) -> dict[str, torch.Tensor]:
    model.train()
    (summed_loss(model, batch) / supervised_tokens(batch)).backward()
    return {name: model.get_submodule(name).weight.grad.clone() for name in names}


# --- step 1: the gradient estimate ----------------------------------------------------------------------

def test_the_estimate_is_the_gradient_of_the_mean_token_loss(batches):
    model = tiny_llama()
    estimate = estimate_gradients(model, batches[:1], targets=ATTENTION, progress=False)
    expected = manual_grads(tiny_llama(), batches[0], list(estimate))
    assert estimate.num_batches == 1 and len(estimate) == 6
    assert getattr(model, "lorakit_state", None) is None  # the plain model stays plain
    for name, grad in expected.items():
        assert estimate[name].dtype == torch.float32 and estimate[name].device.type == "cpu"
        torch.testing.assert_close(estimate[name], grad, atol=1e-7, rtol=1e-5)


def test_the_estimate_averages_over_batches(batches):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    estimate = estimate_gradients(tiny_llama(), batches, targets=names, progress=False)
    first, second = (manual_grads(tiny_llama(), batch, names) for batch in batches)
    assert estimate.num_batches == 2 and list(estimate) == names
    for name in names:
        torch.testing.assert_close(estimate[name], (first[name] + second[name]) / 2, atol=1e-7, rtol=1e-5)


def test_conv1d_gradients_come_in_linear_layout(batches):
    model = tiny_gpt2()
    estimate = estimate_gradients(model, batches[:1], targets=["transformer.h.0.attn.c_attn"], progress=False)
    expected = manual_grads(tiny_gpt2(), batches[0], ["transformer.h.0.attn.c_attn"])
    torch.testing.assert_close(estimate["transformer.h.0.attn.c_attn"], expected["transformer.h.0.attn.c_attn"].T)
    assert estimate["transformer.h.0.attn.c_attn"].shape == (96, 32)  # (d_out, d_in)


def test_the_estimate_restores_flags_grads_and_mode(batches):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight.grad = torch.ones_like(q_proj.weight)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    def failing():
        yield batches[0]
        raise RuntimeError("the data loader broke")

    for run in (lambda: estimate_gradients(model, batches, targets=ATTENTION, progress=False),
                lambda: estimate_gradients(model, failing(), targets=ATTENTION, progress=False)):
        try:
            run()
        except RuntimeError:
            pass
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert not model.training
        assert torch.equal(q_proj.weight.grad, torch.ones_like(q_proj.weight))
        assert all(p.grad is None for p in model.parameters() if p is not q_proj.weight)


def test_the_estimate_also_works_after_attach(batches):
    plain = estimate_gradients(tiny_llama(), batches[:1], targets=ATTENTION, progress=False)
    model = lorakit.attach(tiny_llama(), ATTENTION)  # B = 0: the same function, hence the same gradients
    wrapped = estimate_gradients(model, batches[:1], targets=ATTENTION, progress=False)
    for name in plain:
        torch.testing.assert_close(wrapped[name], plain[name])
    assert all(p.requires_grad == ("adapters" in n) for n, p in model.named_parameters())


def test_gradient_estimate_save_load_round_trip(llama_grads, tmp_path):
    path = llama_grads.save(tmp_path / "grads.safetensors")
    loaded = GradientEstimate.load(path)
    assert loaded.num_batches == llama_grads.num_batches == 2
    assert set(loaded) == set(llama_grads)
    for name in llama_grads:
        assert torch.equal(loaded[name], llama_grads[name])
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(2, 2)})
    with pytest.raises(lorakit.FormatError, match="not a lorakit gradient estimate"):
        GradientEstimate.load(other)


def test_embedding_and_unknown_targets_are_refused(batches):
    model = tiny_llama()
    with pytest.raises(lorakit.TargetError, match="Linear and Conv1D.*'model.embed_tokens'.*Embedding"):
        estimate_gradients(model, batches, targets=LoraConfig(targets=("embed_tokens", "q_proj")), progress=False)
    with pytest.raises(lorakit.TargetError, match="'q_proj' is not in"):
        estimate_gradients(model, batches, targets=["q_proj"], progress=False)
    lorakit.attach(model, LoraConfig(rank=2, targets=("embed_tokens",)))
    grads = {"model.embed_tokens": torch.zeros(64, 128)}
    with pytest.raises(lorakit.TargetError, match="'model.embed_tokens', an Embedding"):
        init_lora_ga(model, grads)


def test_no_supervised_tokens_is_an_error(batches):
    empty = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    with pytest.raises(lorakit.DataError, match="no batch with supervised tokens"):
        estimate_gradients(tiny_llama(), [empty], targets=ATTENTION, progress=False)


# --- step 2: the factors --------------------------------------------------------------------------------

def synthetic(m: int = 24, n: int = 20, k: int = 6, seed: int = 0):
    """A gradient with a known SVD: orthonormal U (m, k), V (n, k), singular values k, k-1, ..., 1."""
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=generator))[0]
    S = torch.arange(k, 0, -1, dtype=torch.float32)
    return U @ torch.diag(S) @ V.T, U, S, V


def which(vectors: torch.Tensor, basis: torch.Tensor) -> list[int]:
    """For each column of ``vectors``, the index of the basis column it equals up to sign (checked)."""
    overlap = (basis.T @ vectors).abs()  # (k, r)
    torch.testing.assert_close(overlap.max(dim=0).values, torch.ones(vectors.shape[1]), atol=1e-4, rtol=0)
    return overlap.argmax(dim=0).tolist()


@pytest.mark.parametrize("direction, a_index, b_index", [
    ("ArB2r", [0, 1, 2], [3, 4, 5]), ("A2rBr", [3, 4, 5], [0, 1, 2]), ("ArBr", [1, 3, 5], [0, 2, 4])])
def test_directions_take_the_specified_singular_vectors(direction, a_index, b_index):
    grad, U, _, V = synthetic()
    A, B = lora_ga_factors(grad, torch.zeros(24, 20), 3, 2.0, direction=direction, scale="unit")
    assert A.shape == (3, 20) and B.shape == (24, 3)
    assert which(A.T, V) == a_index and which(B, U) == b_index


def test_the_random_direction_is_a_seeded_disjoint_split():
    grad, U, _, V = synthetic()
    A, B = lora_ga_factors(grad, torch.zeros(24, 20), 3, 2.0, direction="random", scale="unit", seed=5)
    a_index, b_index = which(A.T, V), which(B, U)
    assert sorted(a_index + b_index) == list(range(6))
    again = lora_ga_factors(grad, torch.zeros(24, 20), 3, 2.0, direction="random", scale="unit", seed=5)
    assert torch.equal(again[0], A) and torch.equal(again[1], B)


def test_scale_options():
    grad, _, S, _ = synthetic()
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 5, generator=generator) @ torch.randn(5, 20, generator=generator)  # rank 5: exact SVD
    sigma = torch.linalg.svdvals(weight)
    s, m, r = 2.0, 24, 3
    stable = m ** 0.25 / math.sqrt(16)

    def norms(scale, convention="official"):
        A, B = lora_ga_factors(grad, weight, r, s, scale=scale, convention=convention)
        return A.norm(dim=1), B.norm(dim=0)  # per row of A, per column of B

    ones = torch.ones(r)
    cases = {
        ("unit", "official"): (ones, ones),
        ("stable", "official"): (ones * stable, ones * stable),
        ("gd", "official"): (ones / s, ones / s),
        ("weightS", "official"): (ones * torch.sqrt(sigma[:r] / s).mean(), ones * torch.sqrt(sigma[:r] / s).mean()),
        ("unit", "peft"): (ones, S[r:2 * r]),
        ("stable", "peft"): (ones, S[r:2 * r] * stable),
        ("gd", "peft"): (ones / s, S[r:2 * r] / s),
        ("weight_svd", "peft"): (ones, S[r:2 * r] * sigma[0] / S[r]),
    }
    for (scale, convention), (a_norms, b_norms) in cases.items():
        got_a, got_b = norms(scale, convention)
        torch.testing.assert_close(got_a, a_norms, atol=1e-4, rtol=1e-4, msg=f"{scale} {convention}: A")
        torch.testing.assert_close(got_b, b_norms, atol=1e-4, rtol=1e-4, msg=f"{scale} {convention}: B")


def test_unknown_options_list_the_known_ones():
    grad = synthetic()[0]
    with pytest.raises(lorakit.ConfigError, match="ArB2r, A2rBr, ArBr, random"):
        lora_ga_factors(grad, grad, 3, 1.0, direction="BrAr")
    with pytest.raises(lorakit.ConfigError, match="with convention='peft': one of stable, gd, unit, weight_svd"):
        lora_ga_factors(grad, grad, 3, 1.0, scale="weightS", convention="peft")
    with pytest.raises(lorakit.ConfigError, match="2 \\* rank = 22"):
        lora_ga_factors(grad, grad, 11, 1.0)


# --- the init: the model is unchanged ----------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(), dict(direction="A2rBr", scale="gd"), dict(direction="ArBr", scale="weightS"),
    dict(direction="random", scale="unit"), dict(convention="peft"), dict(convention="peft", scale="weight_svd")])
def test_the_init_leaves_the_logits_unchanged(llama_grads, options):
    model, ids = tiny_llama(), token_batch()
    expected = logits(model, ids)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear", use_rslora=True))
    before = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    init = init_lora_ga(model, llama_grads, **options)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.adapters["default"].A.detach(), init.A["model.layers.0.mlp.up_proj"])
    assert layer.adapters["default"].B.abs().sum() > 0 and not torch.equal(layer.base_layer.weight, before)
    with lorakit.disabled(model):
        assert not torch.allclose(logits(model, ids), expected, atol=1e-3)


def test_conv1d_init_leaves_the_logits_unchanged(batches):
    config = LoraConfig(rank=4, alpha=16, targets=("c_attn", "c_proj", "c_fc"))
    model, ids = tiny_gpt2(), token_batch()
    grads = estimate_gradients(model, batches, targets=config, progress=False)
    expected = logits(model, ids)
    init_lora_ga(lorakit.attach(model, config), grads)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_a_missing_or_misshapen_gradient_raises_and_changes_nothing(llama_grads):
    model = lorakit.attach(tiny_llama(), ATTENTION)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    partial = {k: v for k, v in llama_grads.items() if k != "model.layers.1.self_attn.v_proj"}
    with pytest.raises(lorakit.AdapterError, match="no gradient for module 'model.layers.1.self_attn.v_proj'"):
        init_lora_ga(model, partial)
    wrong = {**llama_grads, "model.layers.1.self_attn.v_proj": torch.zeros(64, 64)}
    with pytest.raises(lorakit.AdapterError, match="has shape \\(64, 64\\), but its weight is \\(32, 64\\)"):
        init_lora_ga(model, wrong)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_restore_base_gives_back_the_original_weights(llama_grads):
    original = tiny_llama().state_dict()
    model = lorakit.attach(tiny_llama(), ATTENTION)
    init = init_lora_ga(model, llama_grads)
    lorakit.delete_adapter(model, "default")
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])
    restore_base(model, init)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_the_offset_is_refused_on_a_quantized_base_before_any_weight_moves(llama_grads):
    """A quantized base computes its weight on every read, so writing the offset into it would silently do
    nothing; it is refused, and no other base is offset either."""
    model = lorakit.attach(tiny_llama(), ATTENTION)
    init = init_lora_ga(model, llama_grads)
    lorakit.delete_adapter(model, "default")
    before = {name: p.clone() for name, p in model.named_parameters()}
    quantize_model(model, NFConfig(), targets=("model.layers.1.self_attn.v_proj",))
    with pytest.raises(lorakit.StateError, match="quantized NFLinear"):
        restore_base(model, init)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_lora_ga_init_save_load_round_trip(llama_grads, tmp_path):
    init = init_lora_ga(lorakit.attach(tiny_llama(), ATTENTION), llama_grads)
    loaded = LoraGaInit.load(init.save(tmp_path / "init.safetensors"))
    assert loaded.modules == init.modules and loaded.scale == init.scale
    for name in init.modules:
        assert torch.equal(loaded.A[name], init.A[name]) and torch.equal(loaded.B[name], init.B[name])
    with pytest.raises(lorakit.FormatError, match="not a lorakit LoRA-GA init"):
        LoraGaInit.load(llama_grads.save(tmp_path / "grads.safetensors"))


# --- saving: the rank-2r adapter reproduces the trained model on the original base -----------------------

EXPORT_CASES = {
    "llama": (tiny_llama, dict(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))),
    "llama-rslora": (tiny_llama, dict(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)),
    "llama-patterns": (tiny_llama, dict(rank=4, alpha=8, targets=("q_proj", "o_proj", "up_proj"), use_rslora=True,
                                        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 3})),
    "gpt2-conv1d": (tiny_gpt2, dict(rank=4, alpha=16, targets=("c_attn", "c_proj", "c_fc"))),
}


def train_a_little(model, batches, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(lorakit.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        (summed_loss(model, batch) / supervised_tokens(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_the_exported_adapter_reproduces_the_trained_model_on_the_original_base(case, batches, tmp_path):
    make_model, options = EXPORT_CASES[case]
    config, ids = LoraConfig(**options), token_batch()
    model = make_model()
    grads = estimate_gradients(model, batches, targets=config, progress=False)
    init = init_lora_ga(lorakit.attach(model, config), grads)
    train_a_little(model, batches)
    expected = logits(model, ids)

    save_lora_ga_adapter(model, tmp_path / "lora-ga", "default", init)
    ours = make_model()
    lorakit.load_adapter(ours, tmp_path / "lora-ga")
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    record = model_state(ours).require("default")
    assert record.config.rank == 2 * config.rank
    assert all(ours.get_submodule(m).adapters["default"].scale == pytest.approx(config.scale_for(m))
               for m in record.modules)
    theirs = peft.PeftModel.from_pretrained(make_model(), tmp_path / "lora-ga").eval()
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=1e-5)

    lorakit.save_adapter(model, tmp_path / "naive")  # the plain save is wrong on the original base
    naive = make_model()
    lorakit.load_adapter(naive, tmp_path / "naive")
    assert not torch.allclose(logits(naive, ids), expected, atol=1e-3)


def test_a_saved_init_and_adapter_rebuild_the_trained_model_for_resuming(batches, tmp_path):
    model, ids = tiny_llama(), token_batch()
    init = init_lora_ga(lorakit.attach(model, ATTENTION), estimate_gradients(
        model, batches, targets=ATTENTION, progress=False))
    train_a_little(model, batches)
    expected = logits(model, ids)
    init.save(tmp_path / "lora_ga_init.safetensors")
    lorakit.save_adapter(model, tmp_path / "checkpoint")  # what a trainer checkpoint holds: A_f, B_f

    resumed = tiny_llama()
    offset_base(resumed, LoraGaInit.load(tmp_path / "lora_ga_init.safetensors"))
    lorakit.load_adapter(resumed, tmp_path / "checkpoint")
    torch.testing.assert_close(logits(resumed, ids), expected, atol=1e-5, rtol=1e-5)


def test_the_export_refuses_an_init_of_another_adapter(llama_grads, tmp_path):
    model = lorakit.attach(tiny_llama(), ATTENTION)
    init = init_lora_ga(model, llama_grads)
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=("k_proj",)), "other")
    with pytest.raises(lorakit.AdapterError, match="does not match adapter 'other'"):
        save_lora_ga_adapter(model, tmp_path, "other", init)
    assert not any(tmp_path.iterdir())

