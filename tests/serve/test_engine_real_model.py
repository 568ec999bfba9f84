"""Correctness under load on the real default model, through the real server and the real ``openai`` client:
20 concurrent greedy requests of different lengths over four adapters, the base, a weighted combination and an
X-LoRA mixture; each answer equals what ``lorakit generate`` gives for the same model and prompt alone.

Batched fp32 arithmetic is not bit-identical to a batch of one (matrix products of other shapes sum in another
order; differences of ~1e-6 relative), so equal texts hold when no greedy step is a near-tie; the prompts
and adapters here have none (a flip would show as a failure naming the request, not pass silently)."""

from __future__ import annotations

import asyncio

import pytest

import lorakit
from lorakit.eval.generate import generate
from lorakit.models import DEFAULT_MODEL
from tests.helpers.served_dirs import save_adapters, save_mixtures
from tests.serve.server_process import running_server

pytestmark = pytest.mark.real_model

PROMPTS = ["Name a colour.", "What is 2 + 3?", "Write one word about the sea.",
           "List three fruits, separated by commas, and say which one you like best."]
MAX_TOKENS = 12
COMBINATION = {"a": 1.0, "b": -0.5}


@pytest.fixture(scope="module")
def directories(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-served")
    adapters = save_adapters(DEFAULT_MODEL, root / "adapters", ["a", "b", "c", "d"], std=0.03)
    mixtures = save_mixtures(DEFAULT_MODEL, root / "mixtures", {"a": adapters["a"], "c": adapters["c"]},
                             kinds=("xlora",))
    return adapters, mixtures


def alone(model_name: str, served: dict, real_model) -> list[str]:
    """What ``lorakit generate`` gives for each prompt alone (a batch of one) with ``model_name``'s model."""
    base, tokenizer = real_model
    if model_name == "combination":
        for name in COMBINATION:
            lorakit.load_adapter(base, served[name], name, activate=False)
        lorakit.set_active(base, *COMBINATION, weights=list(COMBINATION.values()))
        model = base
    elif model_name in served:
        model = lorakit.load(served[model_name], base).model
    else:
        model = base
    try:
        return [generate(model, tokenizer, [prompt], max_new_tokens=MAX_TOKENS)[0] for prompt in PROMPTS]
    finally:
        for name in lorakit.adapter_names(base):  # the session's model is left as it was found
            lorakit.delete_adapter(base, name)


def test_concurrent_requests_each_equal_generate_alone(directories, real_model):
    adapters, mixtures = directories
    served = {**adapters, **mixtures}
    flags = [flag for name, path in served.items() for flag in ("--adapter", f"{name}={path}")]
    jobs = [(model, prompt) for model in [DEFAULT_MODEL, *adapters, "combination", "xlora"] for prompt in PROMPTS]
    with running_server(DEFAULT_MODEL, *flags, "--max-batch", "16") as server:
        client = server.async_client()

        async def ask(model: str, prompt: str) -> str:
            extra = {"adapters": COMBINATION} if model == "combination" else None
            answer = await client.chat.completions.create(
                model=DEFAULT_MODEL if model == "combination" else model, max_tokens=MAX_TOKENS, temperature=0,
                messages=[{"role": "user", "content": prompt}], extra_body=extra)
            return answer.choices[0].message.content

        async def everyone() -> list[str]:
            return list(await asyncio.gather(*[ask(model, prompt) for model, prompt in jobs]))
        answers = asyncio.run(everyone())
    expected = {model: alone(model, served, real_model) for model in dict.fromkeys(m for m, _ in jobs)}
    for (model, prompt), answer in zip(jobs, answers, strict=True):
        assert answer == expected[model][PROMPTS.index(prompt)], (model, prompt)
    assert len({answer for answer in answers}) > len(PROMPTS), "the adapters did not change the answers"
