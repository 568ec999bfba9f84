"""The OpenAI request bodies: what they ask the engine for, and refusals that name the field (no server)."""

from __future__ import annotations

import pytest

from lorakit.data.encoding import prompt_ids
from lorakit.serve.protocol import ChatBody, CompletionBody, LoadAdapterBody, parse
from lorakit.serve.requests import RequestError, TokenLogprob
from lorakit.serve.responses import ChatFormat, ChoiceParts, CompletionFormat, TokenStrings, clamp
from lorakit.serve.server import check_exposure, is_loopback
from tests.helpers import char_tokenizer

TOKENIZER = char_tokenizer()
CHAT = [{"role": "user", "content": "hi"}]


def refusal(body_type, body: dict | list, *, tokenizer=TOKENIZER) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parsed = parse(body_type, body)
        parsed.requests(tokenizer) if body_type is CompletionBody else parsed.request_for(tokenizer, 128)
    return caught.value


def test_a_completion_is_what_generate_continues_and_openai_defaults_apply():
    body = parse(CompletionBody, {"model": "m", "prompt": "Hello", "frequency_penalty": 0, "best_of": 1})
    (request,) = body.requests(TOKENIZER)
    assert request.prompt_ids == tuple(prompt_ids(TOKENIZER, "Hello", chat=False))
    assert (request.max_tokens, request.n, request.stop, request.logprobs, request.echo) == (16, 1, (), None, False)
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.greedy) == (1.0, 1.0, False)


def test_every_prompt_form_gives_one_request_per_prompt():
    forms = {"ab": [(68, 69)], ("ab", "c"): [(68, 69), (70,)]}
    for prompt, expected in forms.items():
        body = parse(CompletionBody, {"model": "m", "prompt": list(prompt) if isinstance(prompt, tuple) else prompt,
                                      "temperature": 0, "n": 2, "stop": "x", "seed": 3})
        requests = body.requests(TOKENIZER)
        assert [r.prompt_ids for r in requests] == expected
        assert all(r.sampling.greedy and r.n == 2 and r.stop == ("x",) and r.sampling.seed == 3 for r in requests)
    ids = parse(CompletionBody, {"model": "m", "prompt": [[5, 6], [7]]}).requests(TOKENIZER)
    assert [r.prompt_ids for r in ids] == [(5, 6), (7,)]
    assert parse(CompletionBody, {"model": "m", "prompt": [5, 6]}).requests(TOKENIZER)[0].prompt_ids == (5, 6)


def test_a_chat_is_the_rendered_template_and_may_use_the_rest_of_the_context():
    body = parse(ChatBody, {"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                       {"role": "user", "content": [{"type": "text", "text": "h"},
                                                                                    {"type": "text", "text": "i"}]}],
                            "logprobs": True, "top_logprobs": 3})
    request = body.request_for(TOKENIZER, 128)
    text = TOKENIZER.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                         tokenize=False, add_generation_prompt=True)
    assert request.prompt_ids == tuple(TOKENIZER(text, add_special_tokens=False)["input_ids"])
    assert (request.max_tokens, request.logprobs) == (128 - len(request.prompt_ids), 3)
    one_turn = parse(ChatBody, {"model": "m", "messages": CHAT, "max_completion_tokens": 5}).request_for(TOKENIZER, 128)
    assert one_turn.prompt_ids == tuple(prompt_ids(TOKENIZER, "hi", chat=True)) and one_turn.max_tokens == 5


def test_the_extensions_reach_the_engine_request():
    body = parse(CompletionBody, {"model": "base", "prompt": "a", "adapters": {"a": 1, "b": -0.5},
                                  "return_routing": True})
    (request,) = body.requests(TOKENIZER)
    assert request.adapters == {"a": 1.0, "b": -0.5} and request.return_routing


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"prompt": "a"}, "model", "is required"),
    ({"model": "m", "prompt": "a", "max_tokens": -1}, "max_tokens", "must be >= 0"),
    ({"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"model": "m", "prompt": "a", "max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"model": "m", "prompt": "a", "max_tokens": "7"}, "max_tokens", "must be an integer"),
    ({"model": "m", "prompt": "a", "temperature": 3}, "temperature", "must be <= 2"),
    ({"model": "m", "prompt": "a", "top_p": 0}, "top_p", "must be > 0"),
    ({"model": "m", "prompt": "a", "n": 0}, "n", "must be >= 1"),
    ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs", "must be <= 5"),
    ({"model": "m", "prompt": "a", "seed": 2 ** 70}, "seed", "must be <="),
    ({"model": "m", "prompt": "a", "stop": ["a", ""]}, "stop[1]", "non-empty"),
    ({"model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "m", "prompt": "a", "adapters": {"a": 1, "b": "x"}}, "adapters.b", "weight 'x' is not a number"),
    ({"model": "m", "prompt": "a", "adapters": {"a": True}}, "adapters.a", "is not a number"),
    ({"model": "m", "prompt": "a", "adapters": {"a": float("nan")}}, "adapters.a", "not a finite number"),
    ({"model": "m", "prompt": "a", "adapters": {"a": float("inf")}}, "adapters.a", "not a finite number"),
    ({"model": "m", "prompt": "a", "adapters": []}, "adapters", "adapter names and weights"),
    ({"model": "m", "prompt": 5}, "prompt", "a list of token ids"),
    ({"model": "m", "prompt": []}, "prompt", "a list of token ids"),
    ({"model": "m", "prompt": [[1], [2, -1]]}, "prompt[1]", "token ids"),
    ({"model": "m", "prompt": [1, 2, 500]}, "prompt", "not in the vocabulary"),
    ({"model": "m", "prompt": ""}, "prompt", "must not be empty"),
    ({"model": "m", "prompt": "a\ud800"}, "prompt", "Unicode"),
    ({"model": "m", "prompt": "a", "temperature": "hot", "n": 0}, "temperature", "n: must be >= 1"),
])
def test_a_bad_completion_body_names_the_field(body, field, words):
    error = refusal(CompletionBody, body)
    assert (error.field, error.status) == (field, 400) and words in str(error) and str(error).startswith(field)


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"model": "m", "messages": []}, "messages", "at least 1"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "must be one of"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ({"model": "m", "messages": [{"role": "user", "content": None}]}, "messages[0].content", "text parts"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type", "only text parts"),
    ({"model": "m", "messages": CHAT, "max_tokens": 0}, "max_tokens", "must be >= 1"),
    ({"model": "m", "messages": CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "must be <= 20"),
    ({"model": "m", "messages": CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"model": "m", "messages": CHAT, "stream": "yes"}, "stream", "true or false"),
    ([CHAT], "body", "must be a JSON object"),
])
def test_a_bad_chat_body_names_the_field(body, field, words):
    error = refusal(ChatBody, body)
    assert error.field == field and words in str(error), str(error)


def test_a_tokenizer_without_a_chat_template_refuses_chat_by_field():
    plain = char_tokenizer()
    plain.chat_template = None
    assert refusal(ChatBody, {"model": "m", "messages": CHAT}, tokenizer=plain).field == "messages"


def test_the_adapter_loading_body_is_vllms():
    assert parse(LoadAdapterBody, {"lora_name": "a", "lora_path": "a", "load_inplace": True}).lora_path == "a"
    with pytest.raises(RequestError, match="lora_path: is required"):
        parse(LoadAdapterBody, {"lora_name": "a"})


def test_logprobs_take_each_apis_shape():
    strings = TokenStrings(TOKENIZER)
    top = ((68, -0.5), (69, -1.5))
    scored = [(68, None), (69, TokenLogprob(69, float("-inf"), top))]
    completion = CompletionFormat("m", strings, logprobs=True, routing=False)
    body = completion.response([(0, ChoiceParts(text="ab", scored=scored, finish_reason="length"))], 2, 1)
    assert body["choices"][0]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [None, -9999.0],
                                              "top_logprobs": [None, {"a": -0.5, "b": -1.5}], "text_offset": [0, 1]}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    chat = ChatFormat("m", strings, logprobs=True, routing=True)
    chunk = chat.chunk(0, ChoiceParts(text="b", scored=scored[1:], routing=[{"x": 1.0}]), first=True)
    (choice,) = chunk["choices"]
    assert choice["delta"] == {"role": "assistant", "content": "b"} and choice["routing"] == [{"x": 1.0}]
    assert choice["logprobs"]["content"][0] == {"token": "b", "logprob": -9999.0, "bytes": [98], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "b", "logprob": -1.5, "bytes": [98]}]}
    assert clamp(float("nan")) == -9999.0 and clamp(-0.25) == -0.25


def test_a_public_host_needs_a_key_or_insistence(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "key", False)
    with pytest.raises(Exception, match="--insecure-public"):
        check_exposure("0.0.0.0", None, False)
    check_exposure("0.0.0.0", None, True)
    assert "without an API key" in capsys.readouterr().err
