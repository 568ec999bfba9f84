"""ALLoRA: the row coefficient 1/sqrt(||theta_i||^2 + 1/eta^2) on the Adam update or on the gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.optim.allora import Allora, allora_coefficients
from tests.helpers import tiny_llama, token_batch


def test_coefficients_match_the_formula_row_by_row():
    parameter = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, -2.0]])
    coefficients = allora_coefficients(parameter, eta=2.0)
    expected = [1 / math.sqrt(25 + 0.25), 2.0, 1 / math.sqrt(5 + 0.25)]
    assert coefficients.tolist() == pytest.approx(expected, rel=1e-6)


def test_coefficient_is_eta_at_zero_and_one_over_the_norm_for_large_rows():
    assert allora_coefficients(torch.zeros(4, 3), eta=7.5).tolist() == pytest.approx([7.5] * 4)
    large = torch.full((2, 4), 1e4)                                  # row norm 2e4
    assert allora_coefficients(large, eta=1.0).tolist() == pytest.approx([1 / 2e4] * 2, rel=1e-6)


def test_rows_of_conv_and_one_dimensional_parameters():
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    norms = [math.sqrt(sum(v * v for v in range(12 * i, 12 * (i + 1)))) for i in range(2)]
    expected = [1 / math.sqrt(n * n + 1) for n in norms]
    assert allora_coefficients(conv, eta=1.0).tolist() == pytest.approx(expected, rel=1e-6)
    vector = torch.tensor([3.0, 4.0])
    assert allora_coefficients(vector, eta=1.0).tolist() == pytest.approx([1 / math.sqrt(26)], rel=1e-6)


def _parameter_with_grad(values, grad):
    parameter = torch.nn.Parameter(torch.tensor(values))
    parameter.grad = torch.tensor(grad)
    return parameter


def test_update_mode_scales_the_first_adam_step_row_wise():
    lr, eps, eta = 0.1, 1e-8, 1.0
    values = [[3.0, 4.0], [0.0, 0.0]]
    grad = [[0.5, -2.0], [1.0, 0.25]]
    parameter = _parameter_with_grad(values, grad)
    Allora([parameter], lr=lr, eta=eta, eps=eps).step()
    # First Adam step: m_hat = g, v_hat = g^2, so the direction is g / (|g| + eps).
    coefficients = [1 / math.sqrt(25 + 1), 1.0]
    expected = [[values[i][j] - lr * coefficients[i] * grad[i][j] / (abs(grad[i][j]) + eps) for j in range(2)]
                for i in range(2)]
    assert parameter.detach().tolist() == [pytest.approx(row, rel=1e-6) for row in expected]


def test_update_mode_second_step_uses_bias_corrected_moments_and_weight_decay():
    lr, wd, beta1, beta2, eps = 0.05, 0.1, 0.9, 0.999, 1e-8
    parameter = _parameter_with_grad([[1.0, 2.0]], [[0.3, -0.1]])
    optimizer = Allora([parameter], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    theta = [1.0, 2.0]
    first_moment, second_moment = [0.0, 0.0], [0.0, 0.0]
    for step, grad in enumerate(([0.3, -0.1], [-0.2, 0.4]), start=1):
        parameter.grad = torch.tensor([grad])
        optimizer.step()
        coefficient = 1 / math.sqrt(sum(t * t for t in theta) + 1.0)
        theta = [t * (1 - lr * wd) for t in theta]
        for j in range(2):
            first_moment[j] = beta1 * first_moment[j] + (1 - beta1) * grad[j]
            second_moment[j] = beta2 * second_moment[j] + (1 - beta2) * grad[j] ** 2
            m_hat = first_moment[j] / (1 - beta1**step)
            v_hat = second_moment[j] / (1 - beta2**step)
            theta[j] -= lr * coefficient * m_hat / (math.sqrt(v_hat) + eps)
    assert parameter.detach()[0].tolist() == pytest.approx(theta, rel=1e-5)


def test_gradient_mode_equals_adam_on_the_row_scaled_gradient():
    torch.manual_seed(0)
    start = torch.randn(4, 3, 2)
    ours = torch.nn.Parameter(start.clone())
    reference = torch.nn.Parameter(start.clone())
    allora = Allora([ours], lr=0.01, eta=0.5, weight_decay=0.01, scale="gradient")
    adam = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(4, 3, 2)
        coefficients = allora_coefficients(reference, eta=0.5).reshape(4, 1, 1)
        ours.grad = grad.clone()
        reference.grad = grad * coefficients
        allora.step()
        adam.step()
    torch.testing.assert_close(ours.detach(), reference.detach())


@pytest.mark.parametrize("scale", ["update", "gradient"])
def test_a_zero_gradient_row_stays_put(scale):
    parameter = _parameter_with_grad([[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, -1.0]])
    Allora([parameter], lr=0.1, scale=scale).step()
    assert parameter.detach()[0].tolist() == [1.0, 2.0]
    assert parameter.detach()[1].tolist() != [3.0, 4.0]


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    grads = [torch.randn(3, 2) for _ in range(4)]
    first = torch.nn.Parameter(torch.randn(3, 2))
    second = torch.nn.Parameter(first.detach().clone())
    optimizer = Allora([first], lr=0.01, weight_decay=0.1)
    for grad in grads[:2]:
        first.grad = grad.clone()
        optimizer.step()
    second.data.copy_(first.detach())
    resumed = Allora([second], lr=0.5)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))      # as if saved and loaded
    assert resumed.param_groups[0]["lr"] == 0.01
    for grad in grads[2:]:
        first.grad, second.grad = grad.clone(), grad.clone()
        optimizer.step()
        resumed.step()
    assert torch.equal(first.detach(), second.detach())
    assert resumed.state[second]["step"].item() == 4


@pytest.mark.parametrize("eta", [0.0, -1.0, float("inf"), float("nan"), "1"])
def test_invalid_eta_is_a_config_error(eta):
    with pytest.raises(ConfigError, match="eta"):
        Allora([torch.nn.Parameter(torch.zeros(2))], eta=eta)
    with pytest.raises(ConfigError, match="eta"):
        allora_coefficients(torch.zeros(2), eta=eta)


def test_invalid_scale_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="scale.*update, gradient"):
        Allora([torch.nn.Parameter(torch.zeros(2))], scale="both")


def test_it_trains_a_tiny_model():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=4, targets=("q_proj", "v_proj", "lm_head")))
    optimizer = Allora(lorakit.trainable_parameters(model).values(), lr=1e-2)
    ids = token_batch()
    model.train()

    def loss():
        return model(ids, labels=ids).loss

    start = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < start - 0.5
