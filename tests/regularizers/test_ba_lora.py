"""BA-LoRA's consistency, diversity and SVD terms, checked against hand computations in plain Python."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit import ConfigError
from lorakit.regularizers.ba_lora import (
    BaLoraWeights,
    ba_lora_terms,
    nlg_consistency,
    nlg_diversity,
    nlu_consistency,
    nlu_diversity,
    svd_concentration,
)


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_nlu_consistency_is_the_mse_of_row_normalised_logits():
    trained = [[1.0, 2.0, 2.0], [3.0, 0.0, 4.0]]
    original = [[0.0, 3.0, 4.0], [1.0, 1.0, 1.0]]
    squared_errors = []
    for f_row, p_row in zip(trained, original, strict=True):
        f_norm, p_norm = math.sqrt(sum(v * v for v in f_row)), math.sqrt(sum(v * v for v in p_row))
        squared_errors += [(f / f_norm - p / p_norm) ** 2 for f, p in zip(f_row, p_row, strict=True)]
    expected = sum(squared_errors) / len(squared_errors)
    assert nlu_consistency(torch.tensor(trained), torch.tensor(original)).item() == pytest.approx(expected, rel=1e-6)


def test_nlu_diversity_sums_the_squared_off_diagonal_covariances():
    logits = [[1.0, 2.0, 0.0], [3.0, 1.0, -1.0], [2.0, 6.0, 1.0], [0.0, 1.0, 5.0]]
    rows, classes = len(logits), len(logits[0])
    means = [sum(row[j] for row in logits) / rows for j in range(classes)]
    total = 0.0
    for i in range(classes):
        for j in range(classes):
            if i != j:
                covariance = sum((row[i] - means[i]) * (row[j] - means[j]) for row in logits) / (rows - 1)
                total += covariance**2
    assert nlu_diversity(torch.tensor(logits)).item() == pytest.approx(total / classes, rel=1e-6)


def test_nlu_diversity_of_a_single_row_is_zero():
    assert nlu_diversity(torch.tensor([[1.0, 2.0, 3.0]])).item() == 0.0


def test_nlg_consistency_is_the_kl_from_the_original_summed_and_divided_by_the_sequences():
    trained = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    original = [[0.0, 1.0, 0.0], [2.0, -1.0, 1.0]]
    divergence = 0.0
    for f_row, p_row in zip(trained, original, strict=True):
        f_probs, p_probs = softmax(f_row), softmax(p_row)
        divergence += sum(p * math.log(p / f) for p, f in zip(p_probs, f_probs, strict=True))
    value = nlg_consistency(torch.tensor(trained), torch.tensor(original), rows=3)
    assert value.item() == pytest.approx(divergence / 3, rel=1e-5)


def test_nlg_consistency_is_zero_for_equal_distributions_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    assert nlg_consistency(logits, logits.clone(), rows=2).item() == pytest.approx(0.0, abs=1e-6)
    shifted = logits + torch.arange(5.0).unsqueeze(1)               # the same softmax, row by row
    assert nlg_consistency(shifted, logits, rows=2).item() == pytest.approx(0.0, abs=1e-5)
    assert nlg_consistency(torch.randn(5, 7), logits, rows=2).item() > 0


def test_nlg_diversity_is_minus_the_mean_token_entropy():
    logits = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    entropies = [-sum(p * math.log(p) for p in softmax(row)) for row in logits]
    expected = -sum(entropies) / len(entropies)
    assert nlg_diversity(torch.tensor(logits)).item() == pytest.approx(expected, rel=1e-6)


def test_nlg_diversity_of_uniform_logits_is_minus_log_vocabulary():
    assert nlg_diversity(torch.full((4, 11), 3.0)).item() == pytest.approx(-math.log(11), rel=1e-6)


def test_svd_concentration_on_hand_computed_spectra():
    # [[3, 0], [4, 5]]: A^T A = [[25, 20], [20, 25]] has eigenvalues 45 and 5, so sigma = 3 sqrt5, sqrt5.
    assert svd_concentration(torch.tensor([[3.0, 0.0], [4.0, 5.0]]), k=1).item() == pytest.approx(-0.75, rel=1e-6)
    diagonal = torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0]))
    assert svd_concentration(diagonal, k=2).item() == pytest.approx(-7 / 10, rel=1e-6)


def test_svd_concentration_is_minus_one_at_rank_at_most_k():
    rank_one = torch.outer(torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([2.0, 1.0, 0.0, 1.0, -1.0]))
    assert svd_concentration(rank_one, k=3).item() == pytest.approx(-1.0, rel=1e-5)
    three_rows = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert svd_concentration(three_rows, k=3).item() == pytest.approx(-1.0, rel=1e-6)


def test_svd_concentration_of_equal_singular_values_is_minus_k_over_their_count():
    assert svd_concentration(2.5 * torch.eye(5), k=3).item() == pytest.approx(-3 / 5, rel=1e-6)
    assert svd_concentration(torch.eye(4, 6), k=1).item() == pytest.approx(-1 / 4, rel=1e-6)


@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_gradients_flow_to_the_trained_logits_only(task):
    generator = torch.Generator().manual_seed(0)
    trained = torch.randn(6, 5, generator=generator, requires_grad=True)
    original = torch.randn(6, 5, generator=generator, requires_grad=True)
    terms = ba_lora_terms(trained, original, task=task, rows=2, weights=BaLoraWeights(1.0, 1.0, 1.0, 2))
    terms["total"].backward()
    assert original.grad is None
    assert trained.grad is not None and trained.grad.abs().sum() > 0


def test_the_svd_term_has_a_gradient():
    trained = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    svd_concentration(trained, k=2).backward()
    assert trained.grad.abs().sum() > 0


@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_terms_are_the_weighted_functions_and_total_is_their_sum(task):
    generator = torch.Generator().manual_seed(1)
    trained, original = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    weights = BaLoraWeights(consistency=0.5, diversity=2.0, svd=0.25, top_k=2)
    terms = ba_lora_terms(trained, original, task=task, rows=3, weights=weights)
    if task == "nlg":
        consistency, diversity = nlg_consistency(trained, original, 3), nlg_diversity(trained)
    else:
        consistency, diversity = nlu_consistency(trained, original), nlu_diversity(trained)
    assert terms["consistency"].item() == pytest.approx(0.5 * consistency.item(), rel=1e-6)
    assert terms["diversity"].item() == pytest.approx(2.0 * diversity.item(), rel=1e-6)
    assert terms["svd"].item() == pytest.approx(0.25 * svd_concentration(trained, 2).item(), rel=1e-6)
    parts = terms["consistency"] + terms["diversity"] + terms["svd"]
    assert terms["total"].item() == pytest.approx(parts.item(), rel=1e-6)


def test_zero_weights_give_zero_terms_and_the_defaults_are_the_papers():
    assert BaLoraWeights() == BaLoraWeights(consistency=1e-4, diversity=3e-4, svd=1e-4, top_k=3)
    logits = torch.randn(3, 4)
    terms = ba_lora_terms(logits, logits, task="nlu", weights=BaLoraWeights(0.0, 0.0, 0.0))
    assert all(value.item() == 0.0 for value in terms.values())


def test_no_supervised_tokens_give_zero_terms():
    empty = torch.zeros(0, 7)
    terms = ba_lora_terms(empty, empty, task="nlg", rows=2)
    assert set(terms) == {"consistency", "diversity", "svd", "total"}
    assert all(value.item() == 0.0 for value in terms.values())


def test_low_precision_inputs_are_computed_in_float32():
    logits = torch.randn(3, 4).bfloat16()
    terms = ba_lora_terms(logits, logits, task="nlg", rows=1)
    assert all(value.dtype == torch.float32 for value in terms.values())


@pytest.mark.parametrize("field, value", [("consistency", -1e-4), ("diversity", float("nan")),
                                          ("svd", float("inf")), ("top_k", 0), ("top_k", 2.5), ("top_k", True)])
def test_invalid_weights_are_config_errors_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        BaLoraWeights(**{field: value})


def test_unknown_task_missing_rows_and_bad_shapes_are_config_errors():
    logits = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="task.*nlg, nlu"):
        ba_lora_terms(logits, logits, task="vision")
    with pytest.raises(ConfigError, match="rows"):
        ba_lora_terms(logits, logits, task="nlg")
    with pytest.raises(ConfigError, match="rows"):
        nlg_consistency(logits, logits, rows=0)
    with pytest.raises(ConfigError, match="same shape"):
        ba_lora_terms(logits, torch.randn(3, 5), task="nlu")
    with pytest.raises(ConfigError, match="2-D"):
        nlg_diversity(torch.randn(2, 3, 4))
    with pytest.raises(ConfigError, match="k=0"):
        svd_concentration(logits, k=0)
