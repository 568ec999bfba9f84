"""Under more load than the queue holds: every request gets a complete answer or an explicit 429 with
``Retry-After``, never a 5xx, and the server's memory stays bounded; SIGTERM then stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
import urllib.request

import openai
import pytest

from tests.serve.markers import marker_text, write_markers
from tests.serve.server_process import running_server

CLIENTS = 64
WARM_UP_CLIENTS = 8
REQUESTS_PER_CLIENT = 4
TOKENS = 6
PROMPT = "Load test:"
DEADLINE_S = 120.0
GROWTH_MIB = 64


@pytest.fixture(scope="module")
def served(base_dir, tmp_path_factory):
    written = write_markers(base_dir, tmp_path_factory.mktemp("load"), 3)
    flags = [flag for name, (path, _) in written.items() for flag in ("--adapter", f"{name}={path}")]
    with running_server(base_dir, *flags, "--max-queue", "6", "--max-batch", "4") as server:
        yield server, {name: marker for name, (_, marker) in written.items()}


async def one_client(client: openai.AsyncOpenAI, number: int, markers: dict[str, str]) -> list[str]:
    """``REQUESTS_PER_CLIENT`` requests over the adapters, streamed or not; what each ended as."""
    outcomes = []
    names = list(markers)
    for index in range(REQUESTS_PER_CLIENT):
        name = names[(number + index) % len(names)]
        expected = marker_text(markers[name], TOKENS)
        try:
            if (number + index) % 2:
                stream = await client.completions.create(model=name, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                                         stream=True)
                chunks = [chunk async for chunk in stream]
                text = "".join(chunk.choices[0].text for chunk in chunks)
                finish = chunks[-1].choices[0].finish_reason
            else:
                answer = await client.completions.create(model=name, prompt=PROMPT, max_tokens=TOKENS,
                                                         temperature=0)
                text, finish = answer.choices[0].text, answer.choices[0].finish_reason
            assert (text, finish) == (expected, "length"), (name, text, finish)
            outcomes.append("answered")
        except openai.RateLimitError as error:
            assert int(error.response.headers["retry-after"]) >= 1
            outcomes.append("429")
    return outcomes


def test_overload_gets_answers_or_429_never_a_5xx_in_bounded_memory(served):
    server, markers = served

    async def everyone(clients: int) -> list[str]:
        async with server.async_client() as client:
            results = await asyncio.gather(*(one_client(client, number, markers) for number in range(clients)))
        return [outcome for outcomes in results for outcome in outcomes]

    asyncio.run(asyncio.wait_for(everyone(WARM_UP_CLIENTS), DEADLINE_S))  # allocator pools, adapter stacks
    before = server.rss_mib()
    outcomes = asyncio.run(asyncio.wait_for(everyone(CLIENTS), DEADLINE_S))
    after = server.rss_mib()
    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT
    assert outcomes.count("answered") > 0 and outcomes.count("429") > 0, outcomes.count("429")
    assert after - before < GROWTH_MIB, (before, after)
    text = server.http("GET", "/metrics")[2]
    assert 'status="429"' in text and 'status="5' not in text


def test_a_client_that_leaves_cancels_its_generation(served):
    """Ten long requests (five streamed) whose clients hang up at once: their sequences are cancelled, so far
    fewer than their tokens are generated, and the server is idle again soon."""
    server, _ = served
    host, port = server.url.removeprefix("http://").split(":")
    before = metric(server, "lorakit_generation_tokens_total")
    connections = []
    for stream in (False, True) * 5:
        body = json.dumps({"model": "m000", "prompt": "x", "max_tokens": 120, "temperature": 0,
                           "stream": stream}).encode()
        connection = socket.create_connection((host, int(port)), timeout=10)
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        connections.append(connection)
    time.sleep(0.05)
    for connection in connections:
        connection.close()
    deadline = time.monotonic() + 20
    while metric(server, "lorakit_running_sequences") or metric(server, "lorakit_queue_depth"):
        assert time.monotonic() < deadline, "the cancelled requests still run"
        time.sleep(0.1)
    generated = metric(server, "lorakit_generation_tokens_total") - before
    assert generated < 10 * 120 / 4, generated
    assert 'status="499"' in server.http("GET", "/metrics")[2]


def test_sigterm_ends_the_requests_in_flight_clearly_and_exits_0(served):
    """Last in this module: it stops the module's server."""
    server, _ = served
    request = urllib.request.Request(f"{server.base_url}/completions", method="POST", data=json.dumps(
        {"model": "m000", "prompt": "x", "max_tokens": 120, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline()
        assert first.startswith(b"data: ")
        server.process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
    events = [line.removeprefix("data: ") for line in (first.decode() + rest).split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last.get("error", {}).get("code") == "cancelled" or last["choices"][0]["finish_reason"] == "length", last
    started = time.monotonic()
    assert server.process.wait(timeout=30) == 0 and time.monotonic() - started < 30
    assert server.process.poll() == 0


def metric(server, name: str) -> float:
    """The value of an unlabelled metric."""
    return float(re.search(rf"^{name} (\S+)$", server.http("GET", "/metrics")[2], re.MULTILINE).group(1))
