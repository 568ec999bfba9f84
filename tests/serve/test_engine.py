"""The serving engine in-process on the tiny Llama: every answer under continuous batching equals what
``generate`` gives for the same model and prompt alone (adapters, a combination, the three mixtures),
chunked prefill, shared prefills of n choices, seeded sampling, prompt scores, stop strings, cancel and
timeout, and the refusals that name the field."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import lorakit
from lorakit.eval.generate import generate
from lorakit.serve import scheduler
from lorakit.serve.cards import AdapterBusy, RegistrationError, UnknownModel
from lorakit.serve.engine import Engine
from lorakit.serve.requests import QueueFull, RequestError, Sampling
from tests.helpers.served_dirs import save_adapters, save_base, save_mixtures
from tests.serve.engine_client import collect, request, run_all

PROMPTS = ["hello there", "abc", "x", "a somewhat longer prompt, to read"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The base directory, four adapters and three mixtures over two of them."""
    root = tmp_path_factory.mktemp("served")
    base = save_base(root / "base")
    adapters = save_adapters(base, root / "adapters", ["a", "b", "c", "d"])
    mixtures = save_mixtures(base, root / "mixtures", {"a": adapters["a"], "b": adapters["b"]})
    return base, adapters, mixtures


@pytest.fixture
def engine(served):
    base, adapters, mixtures = served
    engine = Engine.open(str(base), max_batch=6, max_resident_adapters=8)
    for name, path in {**adapters, **mixtures}.items():
        engine.register(name, path)
    engine.start()
    yield engine
    engine.shutdown(grace=1.0)


def alone(base, directory, prompt: str, *, weights: dict | None = None, max_tokens: int = MAX_TOKENS) -> str:
    """``generate`` for one prompt on a fresh base with ``directory`` (or a weighted combination) loaded."""
    model, tokenizer = lorakit.load_model(base)
    if weights:
        for name, path in directory.items():
            lorakit.load_adapter(model, path, name, activate=False)
        lorakit.set_active(model, *weights, weights=list(weights.values()))
    elif directory is not None:
        model = lorakit.load(directory, model).model
    return generate(model, tokenizer, [prompt], max_new_tokens=max_tokens, chat=False)[0]


def test_every_answer_under_load_equals_generate_alone(served, engine):
    """28 requests over the base, four adapters, a combination and three mixtures, six rows at a time: rows
    join and leave the batch at every step, each with its own adapter or mixture, and no answer changes."""
    base, adapters, mixtures = served
    combination = {"a": 1.0, "c": -0.5}
    jobs = [(name, prompt) for name in [engine.base_name, *adapters, "combination", *mixtures] for prompt in PROMPTS]
    requests = [request(engine, engine.base_name, p, adapters=combination) if name == "combination" else
                request(engine, name, p) for name, p in jobs]
    answers = run_all(engine, requests)
    for (name, prompt), answer in zip(jobs, answers, strict=True):
        if name == "combination":
            expected = alone(base, {n: adapters[n] for n in combination}, prompt, weights=combination)
        else:
            expected = alone(base, {**adapters, **mixtures}.get(name), prompt)
        assert answer.text == expected, (name, prompt)
        assert answer.ends[0].reason in ("stop", "length")
    assert engine.running == 0


def test_a_prompt_read_in_chunks_gives_the_same_answer(served, engine, monkeypatch):
    base, adapters, _ = served
    monkeypatch.setattr(scheduler, "MAX_CHUNK", 8)
    prompt = "a prompt long enough to be read in several chunks of eight"
    answers = run_all(engine, [request(engine, "a", prompt), request(engine, "b", "abc", max_tokens=30)])
    assert answers[0].text == alone(base, adapters["a"], prompt)
    assert answers[1].text == alone(base, adapters["b"], "abc", max_tokens=30)


def test_a_long_sequence_runs_in_the_long_lane_and_gives_the_same_answer(served, engine, monkeypatch):
    """A sequence longer than LONG_SEQUENCE gets the long twin of the shared lane (slots of its own), next to
    short ones decoding in the shared lane; no answer changes."""
    base, adapters, _ = served
    monkeypatch.setattr(scheduler, "LONG_SEQUENCE", 24)
    long_forwards = []
    forward_packed = engine.scheduler.long.forward_packed
    monkeypatch.setattr(engine.scheduler.long, "forward_packed",
                        lambda *args, **kwargs: long_forwards.append(1) or forward_packed(*args, **kwargs))
    prompt = "a prompt long enough for the long lane"
    answers = run_all(engine, [request(engine, "b", "abc", max_tokens=20), request(engine, "a", prompt),
                               request(engine, "c", "hello there", max_tokens=12)])
    assert answers[1].text == alone(base, adapters["a"], prompt)
    assert answers[0].text == alone(base, adapters["b"], "abc", max_tokens=20)
    assert answers[2].text == alone(base, adapters["c"], "hello there", max_tokens=12)
    assert long_forwards and not engine.scheduler.long.sequences


def test_choices_share_one_prefill_and_seeded_sampling_does_not_depend_on_the_load(engine):
    sampled = Sampling(temperature=1.5, top_p=0.95, seed=3)
    lone = run_all(engine, [request(engine, "a", "hello", n=3, sampling=sampled, max_tokens=12)])[0]
    loaded = run_all(engine, [request(engine, "b", p, max_tokens=20) for p in PROMPTS] +
                     [request(engine, "a", "hello", n=3, sampling=sampled, max_tokens=12)])[-1]
    assert lone.texts == loaded.texts
    assert len(set(lone.texts.values())) > 1, "three choices drawn with their own seeds all alike"
    greedy = run_all(engine, [request(engine, "a", "hello", n=2)])[0]
    assert greedy.texts[0] == greedy.texts[1]
    assert sum(end.completion_tokens for end in greedy.ends.values()) == sum(len(t) for t in greedy.tokens.values())


def test_echo_scores_the_prompt_like_a_direct_forward(served, engine):
    base, adapters, _ = served
    generation = request(engine, "a", "hello there", max_tokens=0, echo=True, logprobs=2)
    answer = run_all(engine, [generation])[0]
    assert answer.ends[0].reason == "length" and answer.text == ""
    model, _ = lorakit.load_model(base)
    lorakit.load(adapters["a"], model)
    ids = torch.tensor([generation.prompt_ids])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    scores = answer.scores
    assert scores.tokens == generation.prompt_ids and scores.logprobs[0] is None
    for position, entry in enumerate(scores.logprobs[1:]):
        assert entry.token_id == generation.prompt_ids[position + 1]
        assert math.isclose(entry.logprob, float(expected[position, entry.token_id]), abs_tol=1e-4)
        assert [t for t, _ in entry.top] == expected[position].topk(2).indices.tolist()


def test_a_stop_string_ends_the_choice_before_it(served, engine):
    base, adapters, _ = served
    full = alone(base, adapters["d"], "abc", max_tokens=20)
    stop = full[3:5]
    answer = run_all(engine, [request(engine, "d", "abc", max_tokens=20, stop=(stop,))])[0]
    assert answer.text == full[: full.index(stop)]
    assert answer.ends[0].reason == "stop"


def test_cancel_and_timeout_free_their_rows(served):
    base, adapters, _ = served
    engine = Engine.open(str(base), max_batch=2)
    engine.register("a", adapters["a"])
    engine.start()
    try:
        cancelled = asyncio.run(collect(engine, request(engine, "a", "abc", max_tokens=100), cancel_after=2))
        assert cancelled.ends[0].reason == "cancelled"
        engine.scheduler.request_timeout = 1e-4  # every request is late by the first iteration
        late = run_all(engine, [request(engine, "a", "abc", max_tokens=100)] * 3)
        assert [a.ends[0].reason for a in late] == ["timeout"] * 3
        assert "timeout of 0.0001 s" in late[0].ends[0].message
        assert engine.running == 0 and engine.queue_depth == 0
    finally:
        engine.shutdown(grace=0.5)


def test_a_full_queue_refuses_instead_of_dropping(served):
    base, _, _ = served
    engine = Engine.open(str(base), max_queue=1)  # not started: nothing drains the queue

    async def submit_two():
        engine.submit(request(engine, engine.base_name, "abc"))
        with pytest.raises(QueueFull, match="1 requests are queued"):
            engine.submit(request(engine, engine.base_name, "abc"))
    asyncio.run(submit_two())


@pytest.mark.parametrize(("fields", "field", "status"), [
    ({"model": "nobody"}, "model", 404),
    ({"prompt": "x" * 130}, "prompt", 400),
    ({"max_tokens": 0}, "max_tokens", 400),
    ({"max_tokens": 200}, "max_tokens", 400),
    ({"n": 7}, "n", 400),
    ({"model": "a", "adapters": {"b": 1.0}}, "adapters", 400),
    ({"adapters": {"zz": 1.0}}, "adapters.zz", 404),
    ({"adapters": {"a": float("nan")}}, "adapters.a", 400),
    ({"adapters": {"a": "1"}}, "adapters.a", 400),
    ({"model": "a", "return_routing": True}, "return_routing", 400),
])
def test_bad_requests_are_refused_naming_the_field(engine, fields, field, status):
    model = fields.pop("model", engine.base_name)
    prompt = fields.pop("prompt", "abc")

    async def submit():
        with pytest.raises(RequestError) as error:
            engine.submit(request(engine, model, prompt, **fields))
        return error.value
    error = asyncio.run(submit())
    assert error.field == field and error.status == status
    assert str(error).startswith(f"{field}: ")


def test_registration_refuses_what_it_cannot_serve(served, engine, tmp_path):
    base, adapters, _ = served
    with pytest.raises(RegistrationError, match="no such directory"):
        engine.register("ghost", tmp_path / "missing")
    with pytest.raises(RegistrationError, match="kind 'model'"):
        engine.register("whole", base)
    with pytest.raises(RegistrationError, match="base model's name"):
        engine.register(engine.base_name, adapters["a"])
    root = adapters["a"].parent
    with pytest.raises(RegistrationError, match="'..'"):
        engine.register("up", "../adapters/a", root=root)
    (root / "link").symlink_to(base)
    with pytest.raises(RegistrationError, match="outside the adapter root"):
        engine.register("link", "link", root=root)
    assert engine.register("inside", "b", root=root).parent == engine.base_name
    assert "ghost" not in engine.served_names() and "inside" in engine.served_names()


def test_more_adapters_than_resident_slots_each_answer_as_alone(served):
    base, adapters, _ = served
    engine = Engine.open(str(base), max_batch=4, max_resident_adapters=2)
    for name, path in adapters.items():
        engine.register(name, path)
    engine.start()
    try:
        names = list(adapters) * 2
        answers = run_all(engine, [request(engine, name, "hello") for name in names])
        for name, answer in zip(names, answers, strict=True):
            assert answer.text == alone(base, adapters[name], "hello"), name
        assert len(lorakit.adapter_names(engine.residency.model)) <= 2
    finally:
        engine.shutdown(grace=0.5)


def test_a_reload_serves_new_requests_only_and_unload_waits_for_users(served, engine):
    base, adapters, _ = served

    async def scenario():
        running = asyncio.ensure_future(collect(engine, request(engine, "a", "abc", max_tokens=40)))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.register, "a", adapters["c"])  # "a" now names c's weights
        after = await collect(engine, request(engine, "a", "abc", max_tokens=40))
        return await running, after
    before, after = asyncio.run(scenario())
    assert before.text == alone(base, adapters["a"], "abc", max_tokens=40)
    assert after.text == alone(base, adapters["c"], "abc", max_tokens=40)
    engine.unload("a")
    with pytest.raises(UnknownModel):
        asyncio.run(collect(engine, request(engine, "a", "abc")))
    assert "a" not in engine.served_names()


def test_unloading_an_adapter_in_use_is_refused_after_the_wait_and_it_stays_served(served, engine):
    async def scenario():
        running = asyncio.ensure_future(collect(engine, request(engine, "b", "abc", max_tokens=100)))
        while not engine.running:
            await asyncio.sleep(0.001)
        with pytest.raises(AdapterBusy, match="still used by 1 requests"):
            await asyncio.to_thread(engine.unload, "b", wait=0.0)
        return await running
    answer = asyncio.run(scenario())
    assert answer.ends[0].reason == "length" and "b" in engine.served_names()
