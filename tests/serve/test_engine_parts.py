"""The engine's parts on their own: the slot cache's masks and moves, text released around stop strings,
per-row sampling, and adapter residency (LRU, versions held by running sequences)."""

from __future__ import annotations

import torch

import lorakit
from lorakit.serve.detokenize import TextStream
from lorakit.serve.requests import Sampling
from lorakit.serve.residency import Residency
from lorakit.serve.sampling import next_tokens, row_generator, token_logprobs
from lorakit.serve.slot_cache import SlotCache, attention_mask, positions
from tests.helpers import char_tokenizer
from tests.helpers.served_dirs import save_adapters, save_base


def test_the_mask_lets_each_row_see_only_its_own_past():
    mask = attention_mask([2, 0], 2, torch.float32, torch.device("cpu"))  # (2, 1, 2, 4)
    seen = (mask[:, 0] == 0).int().tolist()
    assert seen == [[[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 0, 0, 0], [1, 1, 0, 0]]]
    assert positions([2, 0], 2, torch.device("cpu")).tolist() == [[2, 3], [0, 1]]


def test_a_view_writes_each_row_at_its_length_and_a_move_copies_a_slot():
    cache = SlotCache(context_length=16)
    keys = torch.arange(2 * 1 * 1 * 3, dtype=torch.float32).reshape(2, 1, 1, 3)  # (B, H, 1, D)
    k, v = cache.view(0, [3, 1], 1).update(keys, -keys, 0)
    assert k.shape == (2, 1, 4, 3)
    assert torch.equal(k[0, :, 3], keys[0, :, 0]) and torch.equal(k[1, :, 1], keys[1, :, 0])
    cache.move(0, 5, 4)  # a slot beyond the buffer grows it
    assert cache.slots >= 6 and torch.equal(cache.keys[0][5, :, :4], cache.keys[0][0, :, :4])
    cache.move(40, 2, 0)  # a sequence admitted but not yet read has nothing to move, wherever its slot
    before = cache.keys[0][0, :, :4].clone()
    cache.swap(0, 30, 4, 0)  # ... and swaps into a slot the buffer does not have yet
    assert torch.equal(cache.keys[0][30, :, :4], before)


def test_text_is_held_back_while_a_stop_string_may_be_starting():
    tokenizer = char_tokenizer()
    stream = TextStream(tokenizer, stops=("ab",))
    ids = tokenizer("xa", add_special_tokens=False)["input_ids"]
    assert [stream.push(i) for i in ids] == ["x", ""]
    assert stream.push(tokenizer("c", add_special_tokens=False)["input_ids"][0]) == "ac"
    stream.push(tokenizer("a", add_special_tokens=False)["input_ids"][0])
    stream.push(tokenizer("b", add_special_tokens=False)["input_ids"][0])
    assert stream.stopped and stream.released == "xac" and stream.finish() == ""


def test_sampling_rows_are_independent_and_a_tiny_top_p_is_greedy():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    settings = [Sampling(temperature=0.0), Sampling(temperature=1.0, top_p=1e-6, seed=1), Sampling(seed=5)]
    first = next_tokens(logits, settings, [row_generator(s, 0, logits.device) for s in settings])
    assert first[0] == int(logits[0].argmax()) and first[1] == int(logits[1].argmax())
    alone = next_tokens(logits[2:], settings[2:], [row_generator(settings[2], 0, logits.device)])
    assert alone[0] == first[2]
    entry = token_logprobs(logits, first, 2)[0]
    assert entry.token_id == first[0] and len(entry.top) == 2
    assert abs(entry.logprob - float(torch.log_softmax(logits[0], -1)[first[0]])) < 1e-6


def test_residency_keeps_versions_in_use_and_evicts_the_least_recently_used(tmp_path):
    base = save_base(tmp_path / "base")
    paths = save_adapters(base, tmp_path / "adapters", ["a", "b", "c"])
    model, _ = lorakit.load_model(base)
    residency = Residency(model, str(base), max_resident=2)
    versions = {name: residency.register(name, path) for name, path in paths.items()}
    assert len(residency.resident) == 2 and versions["a"].internal not in residency.resident
    assert residency.acquire([versions["a"]]) and residency.acquire([versions["b"]])
    assert not residency.acquire([versions["c"]])  # both resident versions are in use
    reloaded = residency.register("a", paths["c"])  # "a" in use: its old version stays until released
    assert versions["a"].internal in residency.resident and residency.current["a"] is reloaded
    residency.release([versions["a"]])
    assert versions["a"].internal not in residency.resident
    assert versions["a"].internal not in lorakit.adapter_names(model)
