"""Continuous batching: what the engine's thread does at every token boundary.

Each iteration (:meth:`Scheduler.step`) ends cancelled and timed-out choices, admits waiting requests
while there are free rows (in arrival order), reads a budget of prompt tokens, and decodes one token
for every running choice: finished ones leave at once and their slots are reused by the next arrivals.
In the shared lane the prompt chunks and the decode tokens are one packed forward
(:mod:`.packed_batch`: one weight read, no padding); a mixture lane reads its prompts in a padded
forward of their own before its decode step.

A long prompt never stalls the streams already decoding: it is read in chunks over many iterations,
each chunk sized so that it adds about ``PREFILL_SHARE`` of a decode step per request waiting for its
prompt (:meth:`Scheduler._prompt_budget`, from the lane's fitted :class:`~.step_cost.StepCost`). One
newcomer of any length slows the decoding rows by that share; a crowd arriving at once is read in a few
iterations, so the decode batch fills. With nothing decoding, a forward reads ``MAX_CHUNK`` tokens.
The ``n`` choices of a request share one prefill: the prompt's cache is copied into each choice's slot.
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

LONG_SEQUENCE = 512
"""Positions (prompt and new tokens) beyond which a sequence runs in the long twin of the shared lane: KV slots
are as long as the longest sequence in their cache, so one long sequence among short ones would make every
slot that long (memory, and a stall of seconds while the buffers grow)."""
PREFILL_SHARE = 0.6
"""What each request waiting for its prompt may add to a step while rows decode, as a share of a decode step."""
MIN_CHUNK, FIRST_CHUNK, MAX_CHUNK = 8, 32, 512
"""Prompt tokens a forward reads: at least, before its lane's costs are known, and at most (nothing decoding)."""


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
        self.long = Lane(shared.name, shared.model, shared.caches[0].context_length, cost=shared.cost)
        """The shared lane's twin for sequences longer than ``LONG_SEQUENCE``: same model, caches of its own."""
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
        """End what is cancelled or late, admit, read prompt chunks, decode one token everywhere."""
        self._expire()
        self._admit()
        decoding = [lane for lane in self._all_lanes() if lane.decoding]
        budget = self._prompt_budget(sum(len(lane.decoding) for lane in decoding))
        reading = self.prefilling[0].lane if self.prefilling else None
        if reading is not None and reading.packs:
            rows, chunks = self._prompt_chunks(reading, budget)
            self._guarded(reading.decoding + [s for r in rows for s in self.running[r].sequences],
                          lambda: self._packed(reading, rows, chunks))
            decoding = [lane for lane in decoding if lane is not reading]
        elif reading is not None:
            rows, width = self._prefill_rows(reading, budget)
            self._guarded([s for r in rows for s in self.running[r].sequences],
                          lambda: self._prefill(reading, rows, width))
        for lane in decoding:
            self._guarded(lane.decoding, lambda lane=lane: self._decode(lane))
        self.retired = [lane for lane in self.retired if lane.sequences]

    def _all_lanes(self) -> list[Lane]:
        return [self.shared, self.long, *self.lanes.values(), *self.retired]

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
        lane = self.long if len(request.prompt_ids) + request.max_tokens > LONG_SEQUENCE else self.shared
        if request.adapters:
            return lane, Combination(tuple((v.internal, names[v.name]) for v in versions)), versions
        return lane, (versions[0].internal if versions else None), versions

    # -- prefill ---------------------------------------------------------------------------------------

    def _prompt_budget(self, decoding: int) -> int:
        """The prompt tokens the next forward of the lane reading prompts may read, ``decoding`` rows decoding.

        Nothing decoding: ``MAX_CHUNK``. Otherwise every request waiting for its prompt may add ``PREFILL_SHARE``
        of a decode step to the decoding rows' inter-token time: one newcomer (however long its prompt) slows
        the streams by that share, and a crowd of newcomers is read in a few iterations, so that the decode
        batch fills (on a CPU a decode step costs nearly as much for 4 rows as for 32). The lane's fitted
        :class:`~.step_cost.StepCost` turns that time into tokens, counting the weight read a forward of
        their own pays when the lane cannot pack them with decode tokens (or has none to pack them with)."""
        if decoding == 0 or not self.prefilling:
            return MAX_CHUNK
        lane = self.prefilling[0].lane
        share = PREFILL_SHARE * len(self.prefilling)
        step = lane.cost.seconds(decoding)
        alone = not (lane.packs and lane.decoding)  # the prompts' forward is one more weight read
        tokens = None if step is None else lane.cost.tokens_for(share * step, own_forward=alone)
        return FIRST_CHUNK if tokens is None else min(MAX_CHUNK, max(MIN_CHUNK, tokens))

    def _prompt_chunks(self, lane: Lane, budget: int) -> tuple[list[Sequence], list[list[int]]]:
        """The prompts to read next in a lane that packs, in slot order, and the chunk of each: ``budget`` tokens
        in all, no padding."""
        rows, chunks = [], []
        for sequence in [s for s in lane.sequences if s.prefilling]:
            if budget <= 0:
                break
            chunk = sequence.prompt[sequence.cached:sequence.cached + budget]
            rows.append(sequence)
            chunks.append(chunk)
            budget -= len(chunk)
        return rows, chunks

    def _packed(self, lane: Lane, rows: list[Sequence], chunks: list[list[int]]) -> None:
        """One packed forward of ``lane``: every decoding row's next token and the prompt chunks."""
        decoding = lane.decoding
        admitted = [self.running[s] for s in rows]
        scoring = [self._scoring(a) for a in admitted]
        starts = [s.cached for s in rows]
        out = lane.forward_packed(decoding, rows, chunks, keep_all=scoring)
        if decoding:
            self.observer.batch(len(decoding))
            self._advance(lane, decoding, out.decode_logits, None)
        self._chunks_read(rows, admitted, starts, out.chunk_all_logits, out.chunk_logits, None)

    @staticmethod
    def _scoring(admitted: Admitted) -> bool:
        """Whether ``admitted`` asked for its prompt's log-probabilities."""
        return admitted.handle.request.echo and admitted.handle.request.logprobs is not None

    def _prefill_rows(self, lane: Lane, budget: int) -> tuple[list[Sequence], int]:
        """The prompts to read next in a lane that cannot pack, and the chunk width: its sequences still reading
        (a contiguous run of slots), as many as fit ``budget`` tokens once padded to the longest chunk."""
        rows: list[Sequence] = []
        width = 0
        for sequence in [s for s in lane.sequences if s.prefilling]:
            wider = max(width, min(len(sequence.prompt) - sequence.cached, budget))
            if rows and (len(rows) + 1) * wider > budget:
                break
            rows.append(sequence)
            width = wider
        return rows, width

    def _prefill(self, lane: Lane, rows: list[Sequence], width: int) -> None:
        """Read the next ``width`` tokens of each row's prompt in one padded forward; start the rows that finished."""
        chunks = [s.prompt[s.cached:s.cached + width] for s in rows]
        admitted = [self.running[s] for s in rows]
        scoring = [self._scoring(a) for a in admitted]
        starts = [s.cached for s in rows]
        out = lane.forward(rows, chunks, pad=self.pad_id, keep_all=any(scoring),
                           want_routing=any(a.handle.request.return_routing for a in admitted))
        scores = [out.all_logits[row, :len(chunk)].float() if scored else None
                  for row, (chunk, scored) in enumerate(zip(chunks, scoring, strict=True))]
        self._chunks_read(rows, admitted, starts, scores, out.last_logits, out.routing)

    def _chunks_read(self, rows: list[Sequence], admitted: list[Admitted], starts: list[int],
                     scores: list[torch.Tensor | None], last_logits: torch.Tensor,
                     routing: torch.Tensor | None) -> None:
        """A forward read a prompt chunk of each of ``rows`` (from ``starts``): score the chunks where asked
        (``scores[i]``: chunk ``i``'s logits at every position, else None), and start the rows whose prompt is
        now read (``last_logits`` ``(P, V)`` after each chunk; ``routing`` ``(P, N)`` or None)."""
        for row, (sequence, request) in enumerate(zip(rows, admitted, strict=True)):
            if scores[row] is not None:
                self._score(request, scores[row], starts[row])
            if not sequence.prefilling:
                self._prefilled(request, last_logits[row], None if routing is None else routing[row])

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
