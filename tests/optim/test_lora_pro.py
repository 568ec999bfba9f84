"""LoRA-Pro: the equivalent gradient is the least-squares match of G, X drops out of it, the Sylvester X is
the closest to plain LoRA, and the optimizer's step is steps 1-4 of variants.md §5 (checked by hand)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.optim.factor_pairs import LoraFactors, lora_factors
from lorakit.optim.lora_pro import LoraPro, adjusted_gradients, equivalent_gradient, lora_pro_state_bytes
from lorakit.optim.sylvester import solve_symmetric_sylvester
from tests.helpers import TinyConvNet, perturb, tiny_llama, token_batch

ATTENTION = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


def random_problem(m: int = 7, n: int = 5, r: int = 2, scale: float = 2.0, seed: int = 0):
    """Float64 factors A (r, n), B (m, r), a full gradient G (m, n) and its exact gA = s BᵀG, gB = s G Aᵀ."""
    generator = torch.Generator().manual_seed(seed)
    A, B, G = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((r, n), (m, r), (m, n)))
    return A, B, G, scale * B.T @ G, scale * G @ A.T


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` of contiguous copies (torch 2.13's kron raises on a transposed operand)."""
    return torch.kron(a.contiguous(), b.contiguous())


def column_projector(M: torch.Tensor) -> torch.Tensor:
    return M @ torch.linalg.pinv(M)


def product(A, B, hat_A, hat_B, scale) -> torch.Tensor:
    return scale * (B @ hat_A + hat_B @ A)


# --- the pure functions, in float64 ---------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_equivalent_gradient_is_the_projected_gradient_and_beats_plain_lora(scale):
    A, B, G, gA, gB = random_problem(scale=scale)
    full = equivalent_gradient(A, B, gA, gB, scale, delta=0.0)
    P_B, P_A = column_projector(B), column_projector(A.T)
    torch.testing.assert_close(full, P_B @ G + (torch.eye(7, dtype=torch.float64) - P_B) @ G @ P_A)
    assert torch.linalg.norm(full - G) < torch.linalg.norm(product(A, B, gA, gB, scale) - G)


def test_equivalent_gradient_is_the_least_squares_optimum():
    m, n, r, scale = 7, 5, 2, 2.0
    A, B, G, gA, gB = random_problem(m, n, r, scale)
    # Row-major vec: vec(B hat_A) = (B ⊗ I_n) vec(hat_A), vec(hat_B A) = (I_m ⊗ Aᵀ) vec(hat_B).
    linear_map = scale * torch.cat([kron(B, torch.eye(n, dtype=torch.float64)),
                                    kron(torch.eye(m, dtype=torch.float64), A.T)], dim=1)
    best = torch.linalg.lstsq(linear_map, G.reshape(-1, 1), driver="gelsd").solution
    best_product = (linear_map @ best).reshape(m, n)
    full = equivalent_gradient(A, B, gA, gB, scale, delta=0.0)
    torch.testing.assert_close(torch.linalg.norm(full - G), torch.linalg.norm(best_product - G))
    torch.testing.assert_close(full, best_product)


def test_equivalent_gradient_does_not_depend_on_x():
    A, B, G, gA, gB = random_problem(seed=3)
    scale = 2.0
    hat_A, hat_B = adjusted_gradients(A, B, gA, gB, scale, delta=0.0, solve_x=False)
    X = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sylvester_A, sylvester_B = adjusted_gradients(A, B, gA, gB, scale, delta=0.0, solve_x=True)
    assert not torch.allclose(sylvester_A, hat_A)  # the Sylvester X is not 0, so the check below means something
    at_zero = product(A, B, hat_A, hat_B, scale)
    torch.testing.assert_close(product(A, B, hat_A + X @ A, hat_B - B @ X, scale), at_zero)
    torch.testing.assert_close(product(A, B, sylvester_A, sylvester_B, scale), at_zero)
    torch.testing.assert_close(equivalent_gradient(A, B, gA, gB, scale, delta=0.0), at_zero)


def test_sylvester_solution_satisfies_the_equation():
    generator = torch.Generator().manual_seed(5)
    M, N, C = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((3, 6), (2, 4), (3, 4)))
    P, Q = M @ M.T, torch.block_diag(N @ N.T, torch.zeros(2, 2, dtype=torch.float64))  # PSD; Q has rank 2 of 4
    X = solve_symmetric_sylvester(P, Q, C, delta=0.0)
    torch.testing.assert_close(P @ X + X @ Q, C)
    shifted = solve_symmetric_sylvester(P, Q, C, delta=0.1)  # delta solves (P + delta I) X + X Q = C
    torch.testing.assert_close((P + 0.1 * torch.eye(3, dtype=torch.float64)) @ shifted + shifted @ Q, C)
    assert solve_symmetric_sylvester(P.float(), Q.float(), C.float()).dtype == torch.float32


def test_sylvester_x_is_closest_to_plain_lora():
    m, n, r, scale = 7, 5, 3, 2.0
    A, B, G, gA, gB = random_problem(m, n, r, scale, seed=6)
    hat_A, hat_B = adjusted_gradients(A, B, gA, gB, scale, delta=0.0, solve_x=False)
    sylvester_A, sylvester_B = adjusted_gradients(A, B, gA, gB, scale, delta=0.0, solve_x=True)
    X = (sylvester_A - hat_A) @ torch.linalg.pinv(A)
    torch.testing.assert_close(X @ A, sylvester_A - hat_A)
    torch.testing.assert_close(-B @ X, sylvester_B - hat_B)
    P, Q = B.T @ B, A @ A.T
    torch.testing.assert_close(P @ X + X @ Q, -torch.linalg.inv(P) @ gA @ A.T / scale**2)
    # Brute force: min over vec(X) of ||hat_A + X A - gA||² + ||hat_B - B X - gB||².
    eye_r = torch.eye(r, dtype=torch.float64)
    linear_map = torch.cat([kron(eye_r, A.T), -kron(B, eye_r)])
    target = torch.cat([(gA - hat_A).reshape(-1), (gB - hat_B).reshape(-1)])
    best = torch.linalg.lstsq(linear_map, target[:, None], driver="gelsd").solution.reshape(r, r)
    torch.testing.assert_close(X, best)


def test_zero_b_gives_the_row_space_projection():
    A, B, G, _, _ = random_problem(seed=7)
    scale = 2.0
    B = torch.zeros_like(B)
    gA, gB = scale * B.T @ G, scale * G @ A.T
    hat_A, hat_B = adjusted_gradients(A, B, gA, gB, scale, delta=0.0)
    torch.testing.assert_close(hat_A, gA)
    torch.testing.assert_close(equivalent_gradient(A, B, gA, gB, scale, delta=0.0), G @ column_projector(A.T))


# --- the optimizer ----------------------------------------------------------------------------------------

def hand_adjusted(A, B, gA, gB, scale, with_x):
    """variants.md §5 with exact inverses and a Kronecker solve of the Sylvester equation (float64)."""
    if not B.any():
        return gA, gB @ torch.linalg.inv(A @ A.T) / scale**2
    P, Q = B.T @ B, A @ A.T
    P_inverse = torch.linalg.inv(P)
    hat_A = P_inverse @ gA / scale**2
    hat_B = (gB - B @ P_inverse @ B.T @ gB) @ torch.linalg.inv(Q) / scale**2
    if with_x:
        eye = torch.eye(P.shape[0], dtype=torch.float64)
        X = torch.linalg.solve(kron(P, eye) + kron(eye, Q.T), (-hat_A @ A.T).reshape(-1))
        X = X.reshape(P.shape)
        hat_A, hat_B = hat_A + X @ A, hat_B - B @ X
    return hat_A, hat_B


def hand_first_step(A, B, gA, gB, scale, lr, eps=1e-8):
    """Steps 1-4 at step 1, where Adam's bias-corrected moments are g̃ and g̃², so u = g̃ / (|g̃| + eps)."""
    full = product(A, B, *hand_adjusted(A, B, gA, gB, scale, with_x=False), scale)
    u = full / (full.abs() + eps)
    hat_A, hat_B = hand_adjusted(A, B, scale * B.T @ u, scale * u @ A.T, scale, with_x=True)
    return A - lr * hat_A, B - lr * hat_B


def lm_loss(model, batch) -> torch.Tensor:
    return model(batch, labels=batch).loss


def adapted_llama(perturbed: bool = True):
    model = lorakit.attach(tiny_llama(), ATTENTION)
    if perturbed:
        perturb(model, "default")
    return model.train()


@pytest.mark.parametrize("perturbed", [True, False], ids=["general", "zero_B"])
def test_one_step_matches_a_hand_computation(perturbed):
    model, lr = adapted_llama(perturbed), 1e-2
    lm_loss(model, token_batch()).backward()
    pairs = lora_factors(model)
    pair = pairs[0]
    A, B, gA, gB = (t.detach().double().clone() for t in (pair.A, pair.B, pair.A.grad, pair.B.grad))
    raw_grads = [p.grad.clone() for p in (pair.A, pair.B)]
    LoraPro(pairs, lr=lr).step()
    expected_A, expected_B = hand_first_step(A, B, gA, gB, pair.scale, lr)
    assert pair.scale == 2.0 and torch.linalg.norm(expected_B - B) > 1e-3
    torch.testing.assert_close(pair.A.double(), expected_A, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pair.B.double(), expected_B, atol=1e-6, rtol=1e-5)
    assert torch.equal(pair.A.grad, raw_grads[0]) and torch.equal(pair.B.grad, raw_grads[1])  # .grad untouched


def train(model, optimizer, batch, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_loss_decreases_on_a_fixed_batch():
    model = adapted_llama(perturbed=False)
    losses = train(model, LoraPro(lora_factors(model), lr=1e-2), token_batch(), steps=20)
    assert losses[-1] < 0.9 * losses[0]  # 4.87 -> 4.25 (Adam on the factors at lr 1e-2: 4.35)


def test_state_dict_round_trip_continues_identically():
    batch = token_batch()
    model, twin = adapted_llama(), adapted_llama()
    optimizer = LoraPro(lora_factors(model), lr=1e-2)
    train(model, optimizer, batch, steps=3)
    train(twin, LoraPro(lora_factors(twin), lr=1e-2), batch, steps=3)
    restored = LoraPro(lora_factors(twin), lr=0.5)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert restored.param_groups[0]["lr"] == 1e-2 and restored.param_groups[0]["scales"] == [2.0] * 4
    fresh_twin = copy.deepcopy(twin)
    train(model, optimizer, batch, steps=3)
    train(twin, restored, batch, steps=3)
    train(fresh_twin, LoraPro(lora_factors(fresh_twin), lr=1e-2), batch, steps=3)  # no state: must differ
    for pair, twin_pair, fresh_pair in zip(lora_factors(model), lora_factors(twin), lora_factors(fresh_twin),
                                           strict=True):
        assert torch.equal(pair.A, twin_pair.A) and torch.equal(pair.B, twin_pair.B)
        assert not torch.equal(pair.B, fresh_pair.B)


def test_loading_a_state_with_other_scales_is_refused():
    model = adapted_llama()
    state = LoraPro(lora_factors(model)).state_dict()
    state["param_groups"][0]["scales"] = [1.0] * 4
    with pytest.raises(ConfigError, match="scales"):
        LoraPro(lora_factors(model)).load_state_dict(state)


def test_conv2d_factors_train_and_keep_their_shapes():
    model = lorakit.attach(TinyConvNet(), LoraConfig(rank=2, alpha=4, targets=("conv1", "conv2")))
    perturb(model, "default")
    generator = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 3, 6, 6, generator=generator), torch.randn(4, 5, generator=generator)
    pairs = lora_factors(model)
    shapes = [(p.A.shape, p.B.shape) for p in pairs]
    optimizer = LoraPro(pairs, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert [(p.A.shape, p.B.shape) for p in pairs] == shapes
    assert [tuple(optimizer.state[p.A]["exp_avg"].shape) for p in pairs] == [(8, 3 * 3 * 3), (4, 8)]


@pytest.mark.parametrize("make_model", [lambda: adapted_llama(),
                                        lambda: lorakit.attach(TinyConvNet(), LoraConfig(rank=2, targets=("conv1",)))],
                         ids=["llama", "conv"])
def test_state_bytes_are_two_full_fp32_matrices_per_pair(make_model):
    model = make_model()
    pairs = lora_factors(model)
    weights = [model.get_submodule(pair.module).base_layer.weight for pair in pairs]
    expected = sum(2 * 4 * weight.shape[0] * weight[0].numel() for weight in weights)
    assert lora_pro_state_bytes(pairs) == expected
    for pair in pairs:
        pair.A.grad, pair.B.grad = torch.randn_like(pair.A), torch.randn_like(pair.B)
    optimizer = LoraPro(pairs)
    optimizer.step()
    held = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))
    assert held == expected


def test_pairs_without_gradients_are_skipped():
    model = adapted_llama()
    lm_loss(model, token_batch()).backward()
    pairs = lora_factors(model)
    skipped, before = pairs[1], [p.detach().clone() for p in (pairs[1].A, pairs[1].B, pairs[0].B)]
    skipped.A.grad = skipped.B.grad = None
    optimizer = LoraPro(pairs, lr=1e-2)
    optimizer.step()
    assert torch.equal(skipped.A, before[0]) and torch.equal(skipped.B, before[1])
    assert skipped.A not in optimizer.state and not torch.equal(pairs[0].B, before[2])


def test_weight_decay_is_decoupled():
    lr, decay = 1e-2, 0.5
    models = [adapted_llama(), adapted_llama()]
    for model in models:
        lm_loss(model, token_batch()).backward()
    plain_pairs, decayed_pairs = lora_factors(models[0]), lora_factors(models[1])
    before = [p.B.detach().clone() for p in decayed_pairs]
    LoraPro(plain_pairs, lr=lr).step()
    LoraPro(decayed_pairs, lr=lr, weight_decay=decay).step()
    for plain, decayed, old in zip(plain_pairs, decayed_pairs, before, strict=True):
        torch.testing.assert_close(decayed.B, plain.B - lr * decay * old)


@pytest.mark.parametrize("options", [{"lr": -1.0}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"betas": (0.9,)},
                                     {"eps": float("nan")}, {"delta": -1e-8}, {"weight_decay": -0.1}])
def test_bad_hyperparameters_are_refused(options):
    with pytest.raises(ConfigError):
        LoraPro(lora_factors(adapted_llama()), **options)


def test_bad_pairs_are_refused():
    pairs = lora_factors(adapted_llama())
    first = pairs[0]
    bad = [[], [first.A, first.B], pairs + pairs[:1], [LoraFactors("x", first.A, first.A, 2.0)],
           [LoraFactors("x", first.A, first.B, 0.0)], [LoraFactors("x", first.A, first.B.T, 2.0)], first]
    for pairs_argument in bad:
        with pytest.raises(ConfigError):
            LoraPro(pairs_argument)
