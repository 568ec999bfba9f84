"""Generation (batched, left-padded, cached) and evaluation (exact match with task scorers, loss)."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit.data.encoding import encode, prompt_ids
from lorakit.data.example import Example
from lorakit.eval import exact_match as evaluation
from lorakit.eval.exact_match import evaluate
from lorakit.eval.generate import generate
from tests.helpers import char_tokenizer, perturb, tiny_llama

PROMPTS = ["Copy: ab", "Copy: a much longer prompt", "x"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    perturb(model, "default")
    return model, char_tokenizer()


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert any(batched)


def test_cached_generation_equals_uncached(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = torch.tensor([prompt_ids(tokenizer, PROMPTS[1], chat=True)])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    text = tokenizer.decode(cached[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate(model, tokenizer, [PROMPTS[1]], max_new_tokens=8)[0] == text


def test_sampling_is_reproducible_with_a_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=1)
    again = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=1)
    other = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=2)
    assert first == again and first != other


def test_generation_leaves_the_training_mode_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    generate(model, tokenizer, ["x"], max_new_tokens=2)
    assert model.training
    model.eval()


def test_bad_generation_options_are_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(lorakit.ConfigError, match="max_new_tokens=0"):
        generate(model, tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(lorakit.ConfigError, match="temperature=0"):
        generate(model, tokenizer, ["x"], do_sample=True, temperature=0)


def test_exact_match_uses_each_task_s_scorer(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    examples = [Example(prompt="Sort: 3, 1", completion="1, 3", task="sort"),   # sort ignores spaces
                Example(prompt="Copy: ab", completion="ab"),                     # plain: strip only
                Example(prompt="Copy: cd", completion="cd"),
                Example(prompt="Add: 1 + 1", completion="2", task="add")]        # a trailing period is fine
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: ["1,3", " ab \n", "cd.", "2."])
    result = evaluate(model, tokenizer, examples)
    assert result.exact_match == 0.75
    assert result.predictions == ["1,3", " ab \n", "cd.", "2."]


def test_loss_and_perplexity_are_the_token_mean_over_completions(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [Example(prompt="Copy: ab", completion="ab"), Example(prompt="Copy: a longer one", completion="q")]
    result = evaluate(model, tokenizer, examples, max_new_tokens=2)
    total, count = 0.0, 0
    for example in examples:
        encoded = encode(example, tokenizer, chat=True, max_length=512)
        ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])
        with torch.no_grad():
            loss = model(ids, labels=labels).loss  # transformers' own mean over supervised tokens
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
