"""Loading and unloading adapters while the server runs (vLLM's endpoints): confined to the adapter root, a
missing or invalid directory an error, a reload serving new requests only, even under load."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from tests.serve.markers import marker_text, write_markers
from tests.serve.server_process import running_server

PROMPT = "Say: 12 +"
TOKENS = 8


@pytest.fixture(scope="module")
def layout(base_dir, tmp_path_factory):
    """An adapter root with three marker adapters, an empty directory, a file and a link out of it; and a
    marker adapter outside it."""
    tmp = tmp_path_factory.mktemp("runtime")
    root, outside = tmp / "root", tmp / "outside"
    written = write_markers(base_dir, tmp / "written", 4)
    (path_a, a), (path_b, b), (path_c, c), (path_out, _) = written.values()
    root.mkdir()
    for name, path in (("alpha", path_a), ("beta", path_b), ("gamma", path_c)):
        path.rename(root / name)
    outside.mkdir()
    path_out.rename(outside / "evil")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a directory")
    (root / "link").symlink_to(outside / "evil")
    return root, outside, {"alpha": a, "beta": b, "gamma": c}


@pytest.fixture(scope="module")
def server(base_dir, layout):
    root, _, _ = layout
    with running_server(base_dir, "--allow-runtime-loading", "--adapter-root", str(root),
                        "--adapter", f"fixed={root / 'gamma'}", "--max-batch", "8") as server:
        yield server


def load(server, name: str, path: str):
    return server.http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def answer(server, model: str) -> tuple[int, str]:
    status, _, body = server.http("POST", "/v1/completions", {"model": model, "prompt": PROMPT,
                                                              "max_tokens": TOKENS, "temperature": 0})
    return status, body["choices"][0]["text"] if status == 200 else body["error"]["message"]


def served(server) -> set[str]:
    return {card["id"] for card in server.http("GET", "/v1/models")[2]["data"]}


def test_a_loaded_adapter_is_listed_and_answers(server, layout):
    root, _, markers = layout
    status, _, card = load(server, "loaded", "alpha")
    assert status == 200 and (card["id"], card["kind"], card["object"]) == ("loaded", "adapter", "model"), card
    assert "loaded" in served(server)
    assert answer(server, "loaded") == (200, marker_text(markers["alpha"], TOKENS))
    assert load(server, "absolute", str(root / "beta"))[0] == 200
    assert answer(server, "absolute") == (200, marker_text(markers["beta"], TOKENS))


@pytest.mark.parametrize(("path", "words"), [
    ("OUTSIDE/evil", "outside the adapter root"),
    ("../outside/evil", ".."),
    ("ROOT/../outside/evil", ".."),
    ("link", "outside the adapter root"),
    ("ROOT/link", "outside the adapter root"),
    ("missing", "no such directory"),
    ("empty", "cannot be served"),
    ("file.txt", "not a directory"),
])
def test_a_path_outside_the_root_or_not_an_adapter_is_refused(server, layout, path, words):
    root, outside, _ = layout
    path = path.replace("ROOT", str(root)).replace("OUTSIDE", str(outside))
    status, _, body = load(server, "refused", path)
    assert status == 400 and words in body["error"]["message"], body
    assert "refused" not in served(server)
    assert answer(server, "refused")[0] == 404


def test_bad_loading_bodies_and_names_are_refused(server, base_dir):
    assert server.http("POST", "/v1/load_lora_adapter", {"lora_name": "x"})[2]["error"]["param"] == "lora_path"
    assert server.http("POST", "/v1/load_lora_adapter", b"{")[0] == 400
    assert load(server, str(base_dir), "alpha")[0] == 400  # the base's name
    status, _, body = server.http("POST", "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert (status, body["error"]["param"]) == (404, "lora_name")


def test_a_reload_under_the_same_name_serves_the_new_directory(server, layout):
    _, _, markers = layout
    assert load(server, "again", "alpha")[0] == 200
    assert answer(server, "again") == (200, marker_text(markers["alpha"], TOKENS))
    assert load(server, "again", "beta")[0] == 200
    assert answer(server, "again") == (200, marker_text(markers["beta"], TOKENS))


def test_an_unloaded_adapter_is_gone(server):
    assert load(server, "brief", "alpha")[0] == 200
    status, _, body = server.http("POST", "/v1/unload_lora_adapter", {"lora_name": "brief"})
    assert status == 200 and body["deleted"] is True
    assert "brief" not in served(server) and answer(server, "brief")[0] == 404


def test_reloads_under_load_never_answer_with_another_adapter(server, layout):
    """Six clients ask for ``hot`` and ``fixed`` while ``hot`` is reloaded back and forth: each answer is
    wholly one version of ``hot`` (a request keeps the version it started with) or ``fixed``'s marker, and
    the first request after each reload gets the new version."""
    _, _, markers = layout
    texts = {name: marker_text(marker, TOKENS) for name, marker in markers.items()}
    assert load(server, "hot", "alpha")[0] == 200
    stop, answers = threading.Event(), []

    def client(number: int) -> None:
        deadline = time.monotonic() + 40
        for index in range(60):
            if stop.is_set() or time.monotonic() > deadline:
                return
            model = "hot" if (number + index) % 3 else "fixed"
            answers.append((model, *answer(server, model)))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client, number) for number in range(6)]
        try:
            for reload, directory in enumerate(["beta", "alpha"] * 3):
                time.sleep(0.2)
                assert load(server, "hot", directory)[0] == 200, reload
                assert answer(server, "hot") == (200, texts[directory]), reload
        finally:
            stop.set()
            for future in clients:
                future.result(timeout=60)
    hot = [text for model, status, text in answers if model == "hot" and status == 200]
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    assert set(hot) <= {texts["alpha"], texts["beta"]} and len(hot) > 10
    assert {text for model, _, text in answers if model == "fixed"} == {texts["gamma"]}
