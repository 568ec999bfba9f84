"""From engine events to answers, on real handles fed by hand: the endings a tiny model rarely produces on
time (a timeout, a shutdown) and the numbering of several prompts' choices."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request

from lorakit.serve.answers import Answer, respond, stream
from lorakit.serve.requests import ChoiceEnd, GenerationRequest, PromptScores, RequestHandle, TextDelta, TokenLogprob
from lorakit.serve.responses import ChatFormat, CompletionFormat, TokenStrings
from tests.helpers import char_tokenizer

STRINGS = TokenStrings(char_tokenizer())


def handle(loop, n: int = 1, prompt: tuple[int, ...] = (68, 69)) -> RequestHandle:
    return RequestHandle(GenerationRequest(model="m", prompt_ids=prompt, max_tokens=4, n=n), loop)


def http_request(disconnect: asyncio.Event) -> Request:
    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)


def events(text: str) -> list:
    data = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [item if item == "[DONE]" else json.loads(item) for item in data]


def run(make):
    async def main():
        return await make(asyncio.get_running_loop())
    return asyncio.run(main())


def test_a_timeout_is_a_504_or_an_error_event_then_done():
    async def both(loop):
        whole, streamed = handle(loop), handle(loop)
        for h in (whole, streamed):
            h.publish(TextDelta(0, "ab", ()))
            h.publish(ChoiceEnd(0, "timeout", 2, "the request took longer than 1 s"))
        response = await respond(http_request(asyncio.Event()),
                                 Answer([whole], CompletionFormat("m", STRINGS, logprobs=False, routing=False)))
        chunks = [c async for c in stream(Answer([streamed], ChatFormat("m", STRINGS, logprobs=False, routing=False)))]
        return response, "".join(chunks)

    response, text = run(both)
    assert response.status_code == 504
    assert json.loads(response.body)["error"] == {"message": "the request took longer than 1 s",
                                                  "type": "timeout_error", "param": None, "code": "timeout"}
    sent = events(text)
    assert sent[0]["choices"][0]["delta"] == {"role": "assistant", "content": "ab"}
    assert sent[1]["error"]["code"] == "timeout" and sent[2] == "[DONE]" and len(sent) == 3


def test_a_shutdown_is_a_503():
    async def shut(loop):
        h = handle(loop)
        h.publish(ChoiceEnd(0, "cancelled", 0, "the server is shutting down"))
        return await respond(http_request(asyncio.Event()),
                             Answer([h], CompletionFormat("m", STRINGS, logprobs=False, routing=False)))

    assert run(shut).status_code == 503


def test_a_client_that_leaves_cancels_every_handle_of_its_request():
    async def leave(loop):
        handles, gone = [handle(loop), handle(loop)], asyncio.Event()
        waiting = asyncio.ensure_future(respond(http_request(gone), Answer(
            handles, CompletionFormat("m", STRINGS, logprobs=False, routing=False))))
        await asyncio.sleep(0.01)
        gone.set()
        await asyncio.sleep(0.01)
        cancelled = [h.cancelled.is_set() for h in handles]
        for h in handles:  # what the engine then publishes
            h.publish(ChoiceEnd(0, "cancelled", 0, h.cancel_reason))
        return cancelled, (await waiting).status_code

    assert run(leave) == ([True, True], 499)


def test_choices_of_several_prompts_are_numbered_per_prompt_and_each_gets_the_prompts_scores():
    async def two_prompts(loop):
        first, second = handle(loop, n=2, prompt=(68, 69)), handle(loop, n=2, prompt=(70,))
        score = TokenLogprob(69, -0.5, ((69, -0.5),))
        first.publish(PromptScores(0, (68, 69), (None, score)))
        second.publish(PromptScores(0, (70,), (None,)))
        for h, text in ((first, "x"), (second, "y")):
            for index in range(2):
                h.publish(TextDelta(index, f"{text}{index}", (TokenLogprob(71, -1.0),)))
                h.publish(ChoiceEnd(index, "length", 1))
        fmt = CompletionFormat("m", STRINGS, logprobs=True, routing=False)
        return await respond(http_request(asyncio.Event()), Answer([first, second], fmt, ["ab", "c"]))

    body = json.loads(run(two_prompts).body)
    texts = {choice["index"]: choice["text"] for choice in body["choices"]}
    assert texts == {0: "abx0", 1: "abx1", 2: "cy0", 3: "cy1"}
    tokens = {choice["index"]: choice["logprobs"]["tokens"] for choice in body["choices"]}
    assert tokens == {0: ["a", "b", "d"], 1: ["a", "b", "d"], 2: ["c", "d"], 3: ["c", "d"]}
    assert body["choices"][1]["logprobs"]["text_offset"] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
