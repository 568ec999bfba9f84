"""200 per-user adapters registered, 8 resident: every request answered by its own adapter (loaded on demand,
least recently used evicted), and the server's memory does not grow with the adapters served."""

from __future__ import annotations

import concurrent.futures
import random

import pytest

from tests.serve.markers import marker_text, write_markers
from tests.serve.server_process import running_server

ADAPTERS = 200
RESIDENT = 8
TOKENS = 3
GROWTH_MIB = 64
"""How much the server's RSS may grow between a first pass over all adapters and a second over half of them."""


@pytest.fixture(scope="module")
def served(base_dir, tmp_path_factory):
    written = write_markers(base_dir, tmp_path_factory.mktemp("users"), ADAPTERS)
    flags = [flag for name, (path, _) in written.items() for flag in ("--adapter", f"{name}={path}")]
    with running_server(base_dir, *flags, "--max-resident-adapters", str(RESIDENT), "--max-batch", "8") as server:
        yield server, {name: marker for name, (_, marker) in written.items()}


def ask(server, markers: dict[str, str], seed: int, count: int) -> list[tuple[str, int, str]]:
    """``count`` adapters, in a random order, eight at a time: ``(name, status, text)`` each."""
    names = random.Random(seed).sample(list(markers), count)

    def one(name: str) -> tuple[str, int, str]:
        status, _, body = server.http("POST", "/v1/completions", {"model": name, "prompt": "Hi, it is me:",
                                                                  "max_tokens": TOKENS, "temperature": 0})
        return name, status, body["choices"][0]["text"] if status == 200 else str(body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, names, timeout=120))


def test_two_hundred_adapters_each_answer_with_their_own_marker_in_bounded_memory(served):
    server, markers = served
    listed = {card["id"] for card in server.http("GET", "/v1/models")[2]["data"]}
    assert set(markers) <= listed and len(listed) == ADAPTERS + 1
    first = ask(server, markers, seed=0, count=ADAPTERS)
    after_first = server.rss_mib()
    second = ask(server, markers, seed=1, count=ADAPTERS // 2)
    after_second = server.rss_mib()
    for name, status, text in first + second:
        assert (status, text) == (200, marker_text(markers[name], TOKENS)), name
    assert after_second - after_first < GROWTH_MIB, (after_first, after_second)
