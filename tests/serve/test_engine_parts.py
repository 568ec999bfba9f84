"""The engine's parts on their own: the slot cache's masks and moves, text released around stop strings,
per-row sampling, adapter residency (LRU, versions held by running sequences), packed forwards, and the
step-cost fit and the budget that size prompt chunks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.serve import scheduler as scheduler_module
from lorakit.serve.detokenize import TextStream
from lorakit.serve.engine import Engine
from lorakit.serve.lanes import Lane
from lorakit.serve.requests import Sampling
from lorakit.serve.residency import Residency
from lorakit.serve.sampling import next_tokens, row_generator, token_logprobs
from lorakit.serve.sequence import Sequence
from lorakit.serve.slot_cache import SlotCache, attention_mask, positions
from lorakit.serve.step_cost import StepCost
from tests.helpers import char_tokenizer, perturb, tiny_gpt2, tiny_llama
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


def _sequence(row, prompt: list[int]) -> Sequence:
    return Sequence(handle=None, index=0, row=row, holds=(), text=None, generator=None, prompt=prompt)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_forward_gives_each_row_what_its_own_padded_forward_gives(family):
    """Two rows decoding (an adapter, the base) and a prompt chunk of a third (another adapter), packed into one
    sequence, against the same rows through the padded path of a second lane on the same model."""
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    targets = ("q_proj", "v_proj", "down_proj", "lm_head") if family == "llama" else ("c_attn", "c_fc", "lm_head")
    for index, name in enumerate(("n0", "n1")):
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=targets), name)
        perturb(model, name, seed=index)
    prompts = {"n0": [5, 9, 2, 7, 7], None: [3, 1], "n1": [8, 6, 4, 2, 9, 11, 3]}
    results = []
    for packed in (True, False):
        lane = Lane("base", model, context_length=64)
        rows = {row: _sequence(row, prompt) for row, prompt in prompts.items()}
        for sequence in rows.values():
            lane.add(sequence)
        decoding, reading = [rows["n0"], rows[None]], rows["n1"]
        for sequence in decoding:  # read their prompts, then they decode
            lane.forward([sequence], [sequence.prompt], pad=0)
            sequence.generated.append(13)
        chunk = reading.prompt[:4]
        assert lane.packs
        if packed:
            out = lane.forward_packed(decoding, [reading], [chunk], keep_all=[True])
            results.append((out.decode_logits, out.chunk_all_logits[0], out.chunk_logits[0]))
        else:
            decoded = lane.forward(decoding, [[13], [13]], pad=0).last_logits
            read = lane.forward([reading], [chunk], pad=0, keep_all=True)
            results.append((decoded, read.all_logits[0].float(), read.last_logits[0]))
        assert [s.cached for s in decoding] + [reading.cached] == [6, 3, 4]
    for packed, padded in zip(*results, strict=True):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(results[0][0][0], results[0][0][1], atol=1e-3)  # the rows' answers differ


def test_the_step_cost_fit_recovers_a_linear_cost_and_counts_the_weight_read():
    cost = StepCost()
    cost.observe(32, 0.05 + 0.002 * 32)
    assert cost.fit() is None and cost.tokens_for(1.0, own_forward=False) is None  # one size says nothing
    for tokens in (1, 8, 100, 40):
        cost.observe(tokens, 0.05 + 0.002 * tokens)
    read, per_token = cost.fit()
    assert math.isclose(read, 0.05, rel_tol=1e-6) and math.isclose(per_token, 0.002, rel_tol=1e-6)
    assert cost.tokens_for(0.1, own_forward=False) == 50 and cost.tokens_for(0.1, own_forward=True) == 25
    assert math.isclose(cost.seconds(10), 0.07)


def test_the_prompt_budget_grows_with_the_requests_waiting_for_their_prompt(tmp_path):
    """0.6 of the predicted decode step per request waiting for its prompt, in tokens of the fitted cost; less
    the weight read when the prompts cannot ride on the lane's own decode tokens."""
    engine = Engine.open(str(save_base(tmp_path / "base")))
    scheduler, lane = engine.scheduler, engine.scheduler.shared
    assert lane.packs and scheduler.long.cost is lane.cost  # the long twin learns from the same forwards
    for tokens in (1, 8, 64, 200):
        lane.cost.observe(tokens, 0.05 + 0.002 * tokens)
    waiting = SimpleNamespace(lane=lane)
    scheduler.prefilling.append(waiting)
    assert scheduler._prompt_budget(0) == scheduler_module.MAX_CHUNK  # nothing decoding
    lane.sequences.append(SimpleNamespace(prefilling=False))  # a row decoding in the lane: prompts ride along
    assert scheduler._prompt_budget(16) == 24  # 0.6 x (0.05 + 16 x 0.002) s / 0.002 s per token
    scheduler.prefilling.extend([waiting] * 3)
    assert scheduler._prompt_budget(16) == 98  # four waiting: four times the time
    lane.sequences.clear()  # the rows decode in another lane: the prompts' forward pays the read too
    assert scheduler._prompt_budget(16) == 73  # (4 x 0.6 x 0.082 - 0.05) / 0.002
    scheduler.prefilling.extend([waiting] * 60)
    assert scheduler._prompt_budget(16) == scheduler_module.MAX_CHUNK
