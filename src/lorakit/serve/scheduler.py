"""Continuous batching: what the engine's thread does at every token boundary.

Each iteration (:meth:`Scheduler.step`) ends cancelled and timed-out choices, admits waiting requests
while there are free rows (in arrival order), runs *one chunk* of the prompt being prefilled, and then
one decode step for every lane with decoding rows: every running choice gets its next token, finished
ones leave at once and their slots are reused by the next arrivals.

A long prompt never stalls the streams already decoding: it is prefilled in chunks between their decode
steps, and the chunk is sized so that it costs about ``PREFILL_SHARE`` of a decode step (a
multiplicative controller on the measured times), so decoding rows see their inter-token latency grow
by that share at most while a prompt of any length is read. With nothing decoding, a chunk takes
``MAX_CHUNK`` tokens. The ``n`` choices of a request share one prefill: the prompt's cache is copied into
each choice's slot.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lorakit.core.routing import Combination, RowChoice
from lorakit.data.encoding import pad_id
from lorakit.errors import LorakitError
from lorakit.serve.detokenize import TextStream
from lorakit.serve.lanes import Lane
from lorakit.serve.observer import EngineObserver
from lorakit.serve.requests import PromptScores, RequestHandle, TokenLogprob
from lorakit.serve.residency import AdapterVersion, Residency
from lorakit.serve.sampling import next_tokens, row_generator, token_logprobs
from lorakit.serve.sequence import Sequence

LOG = logging.getLogger("lorakit.serve")

PREFILL_SHARE = 0.8
"""A prefill chunk's target cost, as a share of the decode steps it runs between."""
MIN_CHUNK, FIRST_CHUNK, MAX_CHUNK = 8, 32, 512
"""Chunk sizes in tokens: the controller's bounds, where it starts, and a chunk with nothing decoding."""


@dataclass(eq=False)
class Admitted:
    """A request whose choices run: ``sequences[0]`` reads the prompt; the others copy its cache after."""

    handle: RequestHandle
    lane: Lane
    versions: list[AdapterVersion]
    sequences: list[Sequence]
    scores: list[TokenLogprob | None] = field(default_factory=list)
    open: int = 0


class Scheduler:
    """The running requests of one engine and how each iteration advances them."""

    def __init__(self, residency: Residency, shared: Lane, tokenizer, stop_ids: set[int], *, max_batch: int,
                 request_timeout: float | None, observer: EngineObserver) -> None:
        self.residency = residency
        self.shared = shared
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_batch = max_batch
        self.context_length = shared.caches[0].context_length
        self.pad_id = pad_id(tokenizer)
        self.request_timeout = request_timeout
        self.observer = observer
        self.waiting: deque[RequestHandle] = deque()
        self.prefilling: deque[Admitted] = deque()
        self.running: dict[Sequence, Admitted] = {}
        self.lanes: dict[str, Lane] = {}
        """Mixture lanes by served name."""
        self.retired: list[Lane] = []
        """Mixture lanes replaced or unloaded while sequences still ran in them."""
        self._chunk = FIRST_CHUNK
        self._decode_seconds = 0.0

    @property
    def rows(self) -> int:
        """Choices admitted and not ended (each takes a row of a batch and a KV slot)."""
        return len(self.running)

    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def users(self, name: str) -> int:
        """Requests waiting or running that name ``name`` (as their model or in their combination)."""
        requests = [h.request for h in self.waiting]
        requests += list({id(a): a.handle.request for a in self.running.values()}.values())
        return sum(r.model == name or name in (r.adapters or {}) for r in requests)

    # -- one iteration ---------------------------------------------------------------------------------

    def step(self) -> None:
        """End what is cancelled or late, admit, read one batch of prompt chunks, decode one token everywhere."""
        self._expire()
        self._admit()
        decoding = [lane for lane in self._all_lanes() if lane.decoding]
        if self.prefilling:
            lane = self.prefilling[0].lane
            rows, width = self._prefill_rows(lane, self._chunk if decoding else MAX_CHUNK)
            self._guarded([s for r in rows for s in self.running[r].sequences],
                          lambda: self._prefill(lane, rows, width, adapt=bool(decoding)))
        started = time.perf_counter()
        for lane in decoding:
            self._guarded(lane.decoding, lambda lane=lane: self._decode(lane))
        if decoding:
            self._decode_seconds = time.perf_counter() - started
        self.retired = [lane for lane in self.retired if lane.sequences]

    def _all_lanes(self) -> list[Lane]:
        return [self.shared, *self.lanes.values(), *self.retired]

    def _guarded(self, sequences: list[Sequence], work) -> None:
        """Run ``work``; if it fails, end ``sequences`` with the error (the engine itself goes on)."""
        try:
            work()
        except Exception as error:  # noqa: BLE001 - one bad step must not stop the server
            LOG.exception("a generation step failed")
            for sequence in list(sequences):
                self._end(sequence, "error", f"generation failed: {type(error).__name__}: {error}")

    def fail_all(self, message: str) -> None:
        """End every waiting and running choice with ``message`` (after an iteration failed outside a step)."""
        for sequence in list(self.running):
            self._end(sequence, "error", message)
        while self.waiting:
            handle = self.waiting.popleft()
            for index in range(handle.request.n):
                self._orphan(handle, index).end("error", message)

    # -- ending ----------------------------------------------------------------------------------------

    def _expire(self) -> None:
        now = time.monotonic()
        for handle in [h for h in self.waiting if h.cancelled.is_set() or self._late(h, now)]:
            self.waiting.remove(handle)
            reason, message = self._why_stopped(handle, now)
            for index in range(handle.request.n):
                self._orphan(handle, index).end(reason, message)
            self.observer.queued(len(self.waiting))
        for sequence in [s for s, a in self.running.items() if a.handle.cancelled.is_set() or
                         self._late(a.handle, now)]:
            if sequence in self.running:  # not ended with a sibling already
                self._end(sequence, *self._why_stopped(sequence.handle, now))

    def _late(self, handle: RequestHandle, now: float) -> bool:
        return self.request_timeout is not None and now - handle.arrived > self.request_timeout

    def _why_stopped(self, handle: RequestHandle, now: float) -> tuple[str, str]:
        if handle.cancelled.is_set():
            return "cancelled", handle.cancel_reason
        return "timeout", f"the request took longer than the server's timeout of {self.request_timeout:g} s"

    def _end(self, sequence: Sequence, reason: str, message: str = "") -> None:
        admitted = self.running.pop(sequence, None)
        if admitted is None:
            return
        sequence.end(reason, message)
        if sequence.slot >= 0:
            admitted.lane.remove(sequence)
        if admitted in self.prefilling and sequence is admitted.sequences[0]:
            self.prefilling.remove(admitted)
            for sibling in admitted.sequences[1:]:
                self._end(sibling, reason, message)
        admitted.open -= 1
        if admitted.open == 0:
            self.residency.release(admitted.versions)
            self.observer.tokens(len(sequence.prompt), sum(len(s.generated) for s in admitted.sequences))

    # -- admission -------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and self.rows + self.waiting[0].request.n <= self.max_batch:
            handle = self.waiting[0]
            try:
                resolved = self._resolve(handle)
            except LorakitError as error:  # e.g. an evicted adapter's files changed on disk
                resolved = f"its adapter could not be loaded again: {error}"
            if resolved is None:
                return  # its adapters cannot be made resident until running sequences release theirs
            self.waiting.popleft()
            self.observer.queued(len(self.waiting))
            if isinstance(resolved, str):
                for index in range(handle.request.n):
                    self._orphan(handle, index).end("error", resolved)
                continue
            lane, row, versions = resolved
            request = handle.request
            sequences = [Sequence(handle=handle, index=i, row=row, holds=tuple(v.internal for v in versions),
                                  text=TextStream(self.tokenizer, request.stop),
                                  generator=row_generator(request.sampling, i, lane.device),
                                  prompt=list(request.prompt_ids), arrived=handle.arrived)
                         for i in range(request.n)]
            admitted = Admitted(handle, lane, versions, sequences, open=request.n)
            for sequence in sequences:
                self.running[sequence] = admitted
            lane.add(sequences[0])  # the other choices get a slot when the prompt is read
            self.prefilling.append(admitted)

    def _orphan(self, handle: RequestHandle, index: int) -> Sequence:
        """A choice that never ran (its request ended in the queue), to publish its end."""
        return Sequence(handle=handle, index=index, row=None, holds=(), text=TextStream(self.tokenizer),
                        generator=None, prompt=[])

    def _resolve(self, handle: RequestHandle) -> tuple[Lane, RowChoice, list[AdapterVersion]] | str | None:
        """The lane, row choice and adapter versions of a request; a message if what it names went away;
        None if its adapters cannot all be resident now."""
        request = handle.request
        if request.model in self.lanes:
            return self.lanes[request.model], None, []
        names = dict(request.adapters or {})
        if request.model != self.shared.name:
            names = {request.model: 1.0}
        gone = [name for name in names if name not in self.residency.current]
        if gone:
            return f"adapter {gone[0]!r} was unloaded before the request started"
        versions = [self.residency.current[name] for name in names]
        if not self.residency.acquire(versions):
            return None
        if request.adapters:
            return self.shared, Combination(tuple((v.internal, names[v.name]) for v in versions)), versions
        return self.shared, (versions[0].internal if versions else None), versions

    # -- prefill ---------------------------------------------------------------------------------------

    def _prefill_rows(self, lane: Lane, budget: int) -> tuple[list[Sequence], int]:
        """The prompts to read next in ``lane`` and the chunk width: its sequences still reading (a contiguous run
        of slots), as many as fit ``budget`` tokens once padded to the longest chunk."""
        rows: list[Sequence] = []
        width = 0
        for sequence in [s for s in lane.sequences if s.prefilling]:
            wider = max(width, min(len(sequence.prompt) - sequence.cached, budget))
            if rows and (len(rows) + 1) * wider > budget:
                break
            rows.append(sequence)
            width = wider
        return rows, width

    def _prefill(self, lane: Lane, rows: list[Sequence], width: int, *, adapt: bool) -> None:
        """Read the next ``width`` tokens of each row's prompt in one forward; start the rows that finished."""
        chunks = [s.prompt[s.cached:s.cached + width] for s in rows]
        admitted = [self.running[s] for s in rows]
        scoring = [a.handle.request.echo and a.handle.request.logprobs is not None for a in admitted]
        starts = [s.cached for s in rows]
        started = time.perf_counter()
        out = lane.forward(rows, chunks, pad=self.pad_id, keep_all=any(scoring),
                           want_routing=any(a.handle.request.return_routing for a in admitted))
        if adapt:
            self._adapt_chunk(time.perf_counter() - started, len(rows) * width)
        for row, (sequence, request) in enumerate(zip(rows, admitted, strict=True)):
            if scoring[row]:
                self._score(request, out.all_logits[row, :len(chunks[row])].float(), starts[row])
            if not sequence.prefilling:
                self._prefilled(request, out.last_logits[row], None if out.routing is None else out.routing[row])

    def _prefilled(self, admitted: Admitted, logits: torch.Tensor, routing: torch.Tensor | None) -> None:
        """``admitted`` read its prompt: publish its scores, copy the prompt's cache to the other choices, and
        give every choice its first token (``logits`` ``(V,)``, ``routing`` ``(N,)`` after the prompt)."""
        first, lane, request = admitted.sequences[0], admitted.lane, admitted.handle.request
        self.prefilling.remove(admitted)
        if request.echo and request.logprobs is not None:
            first.handle.publish(PromptScores(0, tuple(first.prompt), tuple(admitted.scores)))
        if request.max_tokens == 0:
            for sequence in admitted.sequences:
                self._end(sequence, "length")
            return
        lane.promote(first)
        for sibling in admitted.sequences[1:]:
            lane.add(sibling)
            lane.copy_slot(first, sibling)
            lane.promote(sibling)
        choices = len(admitted.sequences)
        self._advance(lane, admitted.sequences, logits[None].expand(choices, -1),
                      None if routing is None else routing[None].expand(choices, -1))

    def _score(self, admitted: Admitted, logits: torch.Tensor, start: int) -> None:
        """Log-probabilities of the prompt tokens this chunk predicts (the first token has none)."""
        prompt, top = admitted.sequences[0].prompt, admitted.handle.request.logprobs or 0
        if start == 0:
            admitted.scores.append(None)
        targets = prompt[start + 1:start + 1 + logits.shape[0]]
        if targets:
            admitted.scores.extend(token_logprobs(logits[:len(targets)], targets, top))

    def _adapt_chunk(self, seconds: float, tokens: int) -> None:
        """Scale the next chunk so that it costs ``PREFILL_SHARE`` of a decode step (growing at most twofold
        a step, shrinking at once)."""
        if seconds <= 0 or self._decode_seconds <= 0 or tokens < self._chunk:
            return
        wanted = self._chunk * PREFILL_SHARE * self._decode_seconds / seconds
        self._chunk = int(min(MAX_CHUNK, 2 * self._chunk, max(MIN_CHUNK, wanted)))

    # -- decode ----------------------------------------------------------------------------------------

    def _decode(self, lane: Lane) -> None:
        rows = lane.decoding
        self.observer.batch(len(rows))
        want_routing = any(s.request.return_routing for s in rows)
        out = lane.forward(rows, [[s.generated[-1]] for s in rows], pad=self.pad_id, want_routing=want_routing)
        self._advance(lane, rows, out.last_logits, out.routing)

    def _advance(self, lane: Lane, rows: list[Sequence], logits: torch.Tensor, routing: torch.Tensor | None) -> None:
        """Choose, publish and check the next token of each row (``logits`` ``(B, V)``)."""
        tokens = next_tokens(logits, [s.request.sampling for s in rows], [s.generator for s in rows])
        top = max((s.request.logprobs or 0 for s in rows), default=0)
        scored = token_logprobs(logits, tokens, top) if any(s.request.logprobs is not None for s in rows) else None
        now = time.monotonic()
        for row, (sequence, token) in enumerate(zip(rows, tokens, strict=True)):
            entry = scored[row] if scored else TokenLogprob(token, 0.0)
            if scored and sequence.request.logprobs is not None:
                entry = TokenLogprob(token, entry.logprob, entry.top[: sequence.request.logprobs])
            weights = None
            if routing is not None and sequence.request.return_routing:
                weights = dict(zip(lane.experts, routing[row].tolist(), strict=True))
            if sequence.last_token is None:
                self.observer.first_token(now - sequence.arrived)
            else:
                self.observer.token_gap(now - sequence.last_token)
            sequence.last_token = now
            sequence.emit(entry, weights, text=token not in self.stop_ids)
            reason = self._finished(sequence, token)
            if reason:
                self._end(sequence, reason)

    def _finished(self, sequence: Sequence, token: int) -> str | None:
        if token in self.stop_ids or sequence.text.stopped:
            return "stop"
        if len(sequence.generated) >= sequence.request.max_tokens or sequence.length >= self.context_length:
            return "length"
        return None
