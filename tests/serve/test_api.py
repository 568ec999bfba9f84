"""The OpenAI API of ``lorakit serve`` through the real ``openai`` client (and raw HTTP for what a client
would not send): one server on the tiny Llama with three marker adapters and an X-LoRA mixture, an API key,
runtime loading off."""

from __future__ import annotations

import concurrent.futures
import math

import openai
import pytest
import torch

import lorakit
from lorakit.eval.generate import generate
from tests.helpers.served_dirs import save_adapters, save_mixtures
from tests.serve.markers import marker_text, write_markers
from tests.serve.server_process import running_server

KEY = "test-key-0123456789"
PROMPT = "Say: 12 +"
"""A prompt that ends in no marker character, so every marker adapter answers ``m1 m2 m1 ...``."""


@pytest.fixture(scope="module")
def served(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    markers = write_markers(base_dir, root / "markers", 3)
    experts = save_adapters(base_dir, root / "experts", ["e1", "e2"])
    mixture = save_mixtures(base_dir, root / "mixtures", experts)["xlora"]
    adapters = [f"{name}={path}" for name, (path, _) in markers.items()] + [f"mix={mixture}"]
    with running_server(base_dir, *[a for text in adapters for a in ("--adapter", text)], "--max-batch", "8",
                        api_key=KEY) as server:
        yield server, {name: marker for name, (_, marker) in markers.items()}


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def base(base_dir):
    return str(base_dir)


@pytest.fixture(scope="module")
def reference(base_dir):
    """The base model and tokenizer in this process, for what the server must equal."""
    return lorakit.load_model(base_dir)


def test_the_models_are_the_base_each_adapter_with_its_parent_and_the_mixture(client, base):
    cards = {model.id: model.model_dump() for model in client.models.list()}
    assert set(cards) == {base, "m000", "m001", "m002", "mix"}
    assert (cards[base]["kind"], cards[base]["parent"]) == ("base", None)
    assert (cards["m001"]["kind"], cards["m001"]["parent"], cards["m001"]["object"]) == ("adapter", base, "model")
    assert cards["mix"]["kind"] == "xlora" and cards["mix"]["parent"] == base
    assert client.models.retrieve("m002").id == "m002"


def test_every_endpoint_but_health_needs_the_key(server):
    for key in (None, "wrong-key", KEY[:-1]):
        status, headers, body = server.http("GET", "/v1/models", api_key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error", (key, body)
        assert headers.get("www-authenticate") == "Bearer"
        assert server.http("POST", "/v1/completions", {"model": "m000", "prompt": "a"}, api_key=key)[0] == 401
        assert server.http("GET", "/metrics", api_key=key)[0] == 401
        assert server.http("GET", "/no/such/path", api_key=key)[0] == 401
    assert server.http("GET", "/health", api_key=None)[:3:2] == (200, {"status": "ok"})
    assert server.http("GET", "/v1/models")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()


def test_a_greedy_completion_and_chat_equal_lorakit_generate(client, base, reference):
    model, tokenizer = reference
    for prompt in ("Hello!", PROMPT):
        answer = client.completions.create(model=base, prompt=prompt, max_tokens=10, temperature=0)
        assert answer.choices[0].text == generate(model, tokenizer, [prompt], max_new_tokens=10, chat=False)[0]
        assert answer.usage.prompt_tokens == len(prompt) and answer.object == "text_completion"
        chat = client.chat.completions.create(model=base, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == generate(model, tokenizer, [prompt], max_new_tokens=10,
                                                           chat=True)[0]
        assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"


def test_each_adapter_answers_with_its_own_marker(served, client):
    _, markers = served
    for name, marker in markers.items():
        answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        assert answer.choices[0].text == marker_text(marker, 6) and answer.choices[0].finish_reason == "length"
        assert (answer.usage.completion_tokens, answer.usage.total_tokens) == (6, 6 + len(PROMPT))
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              temperature=0)
        assert chat.choices[0].message.content == marker_text(marker, 4)


def test_a_stream_sends_chunks_then_the_finish_then_done(served, server, client):
    _, markers = served
    chunks = list(client.completions.create(model="m001", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == marker_text(markers["m001"], 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    chat = list(client.chat.completions.create(model="m002", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == marker_text(markers["m002"], 5)
    assert chat[-1].choices[0].finish_reason == "length"
    status, headers, text = server.http("POST", "/v1/completions", {"model": "m000", "prompt": PROMPT,
                                                                    "max_tokens": 3, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]" and len(events) >= 3


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt(client, base, reference):
    model, tokenizer = reference
    prompt = "Hello there!"
    answer = client.completions.create(model=base, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    (choice,) = answer.choices
    logprobs = choice.logprobs
    assert choice.text == prompt and logprobs.tokens == list(prompt)
    assert logprobs.text_offset == list(range(len(prompt)))
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position, (value, top) in enumerate(zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True)):
        assert math.isclose(value, float(expected[position, ids[0, position + 1]]), abs_tol=1e-4)
        best = expected[position].topk(2)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert answer.usage.completion_tokens == 0
    both = client.completions.create(model=base, prompt=prompt, max_tokens=0, echo=True, logprobs=2, n=2)
    assert [choice.logprobs.token_logprobs for choice in both.choices] == [logprobs.token_logprobs] * 2
    streamed = list(client.completions.create(model="m000", prompt=prompt, max_tokens=2, echo=True, temperature=0,
                                              stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == prompt + "ab"


def test_chat_logprobs_name_each_token_and_its_alternatives(client):
    chat = client.chat.completions.create(model="m000", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [entry.token for entry in content] == list("aba")
    assert all(entry.top_logprobs[0].token == entry.token and len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.bytes == list(entry.token.encode()) and entry.logprob <= 0 for entry in content)


def test_choices_are_numbered_per_prompt_as_openai_does(served, client, base):
    _, markers = served
    answer = client.completions.create(model="m002", prompt=["Say: 1 +", "Say: 2 +", "Say: 3 +"], n=2, max_tokens=4,
                                       temperature=0)
    assert sorted(choice.index for choice in answer.choices) == list(range(6))
    assert {choice.text for choice in answer.choices} == {marker_text(markers["m002"], 4)}
    assert answer.usage.prompt_tokens == 3 * len("Say: 1 +") and answer.usage.completion_tokens == 6 * 4
    sampled = client.completions.create(model=base, prompt="Hello!", n=2, max_tokens=12, seed=5)
    assert len({choice.text for choice in sampled.choices}) == 2, "two choices drawn from one generator"


def test_a_stop_string_ends_the_text_before_it(client):
    answer = client.completions.create(model="m000", prompt=PROMPT, max_tokens=8, temperature=0, stop=["ba", "zz"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == ("a", "stop")
    chat = client.chat.completions.create(model="m001", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0, stop="cb")
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("b", "stop")


def test_the_same_seed_gives_the_same_text_alone_and_under_load(client, base):
    def sample(seed: int, prompt: str = "Hello!") -> str:
        return client.completions.create(model=base, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    alone = sample(7)
    assert sample(7) == alone and sample(8) != alone
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(sample, seed, f"Load {seed}:") for seed in range(100, 106)]
        under_load = pool.submit(sample, 7)
        assert under_load.result(timeout=60) == alone
        assert all(len(other.result(timeout=60)) > 0 for other in others)


def test_a_weighted_combination_and_routing_come_through_extra_body(served, client, base):
    _, markers = served
    answer = client.completions.create(model=base, prompt=PROMPT, max_tokens=4, temperature=0,
                                       extra_body={"adapters": {"m001": 1.0}})
    assert answer.choices[0].text == marker_text(markers["m001"], 4)
    routed = client.completions.create(model="mix", prompt=PROMPT, max_tokens=3, temperature=0,
                                       extra_body={"return_routing": True})
    routing = routed.choices[0].model_extra["routing"]
    assert len(routing) == 3 and all(isinstance(w, dict) and set(w) == {"e1", "e2"} for w in routing), routing
    chat = client.chat.completions.create(model="mix", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, extra_body={"return_routing": True})
    assert len(chat.choices[0].model_extra["routing"]) == 2


@pytest.mark.parametrize(("options", "status", "field"), [
    ({"model": "no-such-model"}, 404, "model"),
    ({"extra_body": {"adapters": {"no-such-adapter": 1.0}}}, 404, "adapters.no-such-adapter"),
    ({"extra_body": {"adapters": {"m000": "x"}}}, 400, "adapters.m000"),
    ({"prompt": "x" * 200}, 400, "prompt"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": 1000}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"logprobs": 9}, 400, "logprobs"),
    ({"model": "m000", "extra_body": {"return_routing": True}}, 400, "return_routing"),
])
def test_a_bad_completion_request_is_a_4xx_naming_the_field(client, base, options, status, field):
    request = {"model": base, "prompt": PROMPT, "max_tokens": 4, **options}
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**request)
    error = caught.value
    assert error.status_code == status, error.body
    assert error.body["param"] == field and error.body["message"].startswith(field), error.body


def test_bodies_no_client_would_send_are_4xx_naming_the_problem(server, base):
    cases = [
        (b'{"model": "m000", "prompt": ', 400, "body", "not valid JSON"),
        (b"\xff\xfe not utf-8", 400, "body", "not valid JSON"),
        (b"[1, 2]", 400, "body", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body", ""),
        (b'{"model": "m000", "prompt": "a", "adapters": {"m000": NaN}}', 400, "adapters.m000", "finite"),
        (b'{"model": "m000", "prompt": "a", "n": true}', 400, "n", "integer"),
        (b'{"model": "m000", "prompt": "a\\ud800"}', 400, "prompt", "Unicode"),
        (b"", 400, "body", "not valid JSON"),
    ]
    for raw, status, field, words in cases:
        got, _, body = server.http("POST", "/v1/completions", raw)
        assert (got, body["error"]["param"]) == (status, field) and words in body["error"]["message"], (raw[:40], body)
    got, _, body = server.http("POST", "/v1/chat/completions", {"model": "m000", "messages": [{"role": "robot",
                                                                                               "content": "x"}]})
    assert (got, body["error"]["param"]) == (400, "messages[0].role")
    assert server.http("GET", "/v1/nothing")[0] == 404
    assert server.http("GET", "/v1/completions")[0] == 405
    assert server.http("POST", "/v1/completions", {"model": base, "prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_runtime_loading_is_off_unless_allowed(server, tmp_path):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}),
                       ("/v1/unload_lora_adapter", {"lora_name": "m000"})):
        status, _, answer = server.http("POST", path, body)
        assert status == 403 and "--allow-runtime-loading" in answer["error"]["message"]


def test_metrics_are_prometheus_text(server):
    status, headers, text = server.http("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("lorakit_requests_total", "lorakit_prompt_tokens_total", "lorakit_generation_tokens_total",
                 "lorakit_queue_depth", "lorakit_running_sequences", "lorakit_time_to_first_token_seconds_bucket",
                 "lorakit_inter_token_latency_seconds_bucket", "lorakit_request_duration_seconds_bucket"):
        assert name in text, name
    assert 'lorakit_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'status="401"' in text

