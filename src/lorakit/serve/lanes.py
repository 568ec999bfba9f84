"""A model the engine runs, with the KV slots of the sequences it is running.

The *shared lane* is the base model holding every resident adapter: its rows run through the core's
per-row routing (:class:`~lorakit.core.routing.PerRowRouting`: each row its adapter, a weighted
combination or nothing, stacked, no loop over adapters), so requests for hundreds of adapters share
one batch. A *mixture lane* runs an X-LoRA, MixLoRA or MeteoRA model, which routes per token by
itself; X-LoRA's two passes each keep their own slots (:attr:`Lane.passes`). A lane's slots are
contiguous: ``sequences[i]`` is in slot ``i``, and the sequences still reading their prompts come after
the decoding ones. The shared lane reads prompt chunks and decode tokens in one packed forward
(:meth:`Lane.forward_packed`); the others read prompts in a padded forward (:meth:`Lane.forward`).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.activation import disabled, routed
from lorakit.core.records import recording
from lorakit.core.routing import PerRowRouting, RowChoice
from lorakit.core.stack_cache import frozen_factors
from lorakit.core.state import STATE_ATTR
from lorakit.io.directory_kinds import Loaded
from lorakit.mixtures.meteora.model import GATE_LOGITS, MeteoraModel
from lorakit.mixtures.mixlora.attach import expert_names
from lorakit.mixtures.mixlora.ffn import ROUTER_LOGITS
from lorakit.mixtures.mixlora.storage import read_config
from lorakit.mixtures.xlora.model import XLoraModel
from lorakit.serve.packed_batch import Chunk, PackedLayout, PackedView, packed_attention_on, packed_parts
from lorakit.serve.sequence import Sequence
from lorakit.serve.slot_cache import SlotCache, attention_mask, positions
from lorakit.serve.step_cost import StepCost


def mixture_experts(loaded: Loaded) -> tuple[str, ...]:
    """The columns of a mixture's routing: X-LoRA's and MeteoRA's experts, or MixLoRA's routed experts
    (its attention adapter is not routed)."""
    if isinstance(loaded.model, XLoraModel):
        return loaded.model.experts
    if isinstance(loaded.model, MeteoraModel):
        return tuple(loaded.model.names)
    return tuple(expert_names(read_config(loaded.path)[0]))


@dataclass(frozen=True)
class StepOutput:
    """What one forward of a lane gives: each row's logits after its last token ``(B, V)``; every position's
    ``(B, T, V)`` when asked (scoring a prompt); and, when asked, each row's expert weights after its last
    token ``(B, N)`` (mixtures; None otherwise)."""

    last_logits: torch.Tensor
    all_logits: torch.Tensor | None
    routing: torch.Tensor | None


@dataclass(frozen=True)
class PackedOutput:
    """What a packed forward gives: the decoding rows' next-token logits ``(D, V)``, each prompt row's logits after
    its chunk ``(P, V)``, and each prompt row's logits at every position of its chunk where asked (scoring)."""

    decode_logits: torch.Tensor
    chunk_logits: torch.Tensor
    chunk_all_logits: list[torch.Tensor | None]


class Lane:
    """One model, its slot caches, and the sequences in its slots (in slot order)."""

    def __init__(self, name: str, model: nn.Module, context_length: int, *, experts: Seq[str] = (),
                 cost: StepCost | None = None) -> None:
        self.name = name
        self.model = model
        self.experts = tuple(experts)
        """The mixture's experts (the routing's columns); empty for the shared lane."""
        self.passes = 2 if isinstance(model, XLoraModel) else 1
        self.caches = [SlotCache(context_length) for _ in range(self.passes)]
        self.sequences: list[Sequence] = []
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cost = cost or StepCost()
        """What this lane's forwards cost (fitted on the ones it ran; shared by lanes on one model): the
        scheduler's chunk sizes."""

    @property
    def shared(self) -> bool:
        return not self.experts

    @property
    def decoding(self) -> list[Sequence]:
        """The sequences past their prompt, a prefix of :attr:`sequences`."""
        return [s for s in self.sequences if not s.prefilling]

    def add(self, sequence: Sequence) -> None:
        sequence.slot = len(self.sequences)
        self.sequences.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        """Free ``sequence``'s slot, keeping the decoding slots a contiguous prefix: the last decoding
        sequence moves into the hole, and a sequence being prefilled after it moves down one (each
        move copies that sequence's cache, so a departure costs at most two slot copies)."""
        hole = sequence.slot
        rest = self.sequences[hole + 1:]
        self.sequences = self.sequences[:hole]
        decoding = [s for s in rest if not s.prefilling]
        prefilling = [s for s in rest if s.prefilling]
        if decoding:
            self._move(decoding[-1], hole)
            self.sequences.extend([decoding[-1], *decoding[:-1]])
        for waiting in prefilling:
            self._move(waiting, len(self.sequences))
            self.sequences.append(waiting)
        if not self.sequences:
            for cache in self.caches:
                cache.release()

    def _move(self, sequence: Sequence, slot: int) -> None:
        if sequence.slot != slot:
            for cache in self.caches:
                cache.move(sequence.slot, slot, sequence.cached)
            sequence.slot = slot

    def promote(self, sequence: Sequence) -> None:
        """``sequence`` has read its prompt: swap it before every sequence still reading theirs, so that the
        decoding sequences stay a contiguous prefix of the slots."""
        waiting = next((s for s in self.sequences if s.prefilling), None)
        if waiting is not None and waiting.slot < sequence.slot:
            for cache in self.caches:
                cache.swap(waiting.slot, sequence.slot, waiting.cached, sequence.cached)
            waiting.slot, sequence.slot = sequence.slot, waiting.slot
            self.sequences[waiting.slot], self.sequences[sequence.slot] = waiting, sequence

    def copy_slot(self, source: Sequence, target: Sequence) -> None:
        """Give ``target`` (just added) the cache of ``source`` (another choice of the same prompt)."""
        for cache in self.caches:
            cache.move(source.slot, target.slot, source.cached)
        target.cached = source.cached

    def forward(self, rows: list[Sequence], chunks: list[list[int]], *, pad: int, keep_all: bool = False,
                want_routing: bool = False) -> StepOutput:
        """Run ``chunks[b]`` for the contiguous slots of ``rows``, each from its cached length.

        Shorter chunks are right-padded with ``pad`` to the longest: the padding's keys land after the row's
        last real token, where no later query looks (they are overwritten by the next tokens), so a row's
        result does not depend on the others'."""
        first, width = rows[0].slot, max(len(c) for c in chunks)
        starts, last = [s.cached for s in rows], [len(c) - 1 for c in chunks]
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in chunks], device=self.device)  # (B, width)
        inputs = dict(input_ids=ids, position_ids=positions(starts, width, self.device), use_cache=True,
                      attention_mask=attention_mask(starts, width, self.dtype, self.device))
        views = [cache.view(first, starts, width) for cache in self.caches]
        last_index = torch.tensor(last, device=self.device)[:, None]  # (B, 1): each row's last real position
        started = time.perf_counter()
        with torch.no_grad(), frozen_factors(), self._routing([s.row for s in rows]), recording() as records:
            if self.passes == 2:  # X-LoRA computes every position's logits
                out = self.model(**inputs, past_key_values=tuple(views))
            else:
                out = self.model(**inputs, cache=views[0], logits_to_keep=0 if keep_all else last_index)
        self.cost.observe(ids.numel(), time.perf_counter() - started)
        for sequence, chunk in zip(rows, chunks, strict=True):
            sequence.cached += len(chunk)
        full = out.logits.shape[1] == width  # (B, width, V); otherwise (B, 1, V) at each row's last position
        last_logits = (out.logits.gather(1, last_index[:, :, None].expand(-1, 1, out.logits.shape[-1])) if full
                       else out.logits)[:, 0].float()
        routing = self._expert_weights(out, records) if want_routing else None
        if routing is not None:
            routing = routing.gather(1, last_index[:, :, None].expand(-1, 1, routing.shape[-1]))[:, 0]
        return StepOutput(last_logits, out.logits if keep_all else None, routing)

    def forward_packed(self, decoding: list[Sequence], rows: list[Sequence], chunks: list[list[int]], *,
                       keep_all: list[bool]) -> PackedOutput:
        """One packed forward (:mod:`.packed_batch`): the next token of every ``decoding`` row and ``chunks[i]`` of
        ``rows[i]``'s prompt, each from its cached length; logits at every position of ``chunks[i]`` where
        ``keep_all[i]``, else after its last token. Only for lanes that :attr:`packs`."""
        body, head = packed_parts(self.model)  # looked up each time: attaching adapters wraps the head
        layout = PackedLayout([s.cached for s in decoding],
                              [Chunk(s.slot, s.cached, len(c)) for s, c in zip(rows, chunks, strict=True)], self.device)
        ids = [s.generated[-1] for s in decoding] + [token for chunk in chunks for token in chunk]
        lengths = [1] * len(decoding) + [len(c) for c in chunks]
        kept = [1] * len(decoding) + [len(c) if a else 1 for c, a in zip(chunks, keep_all, strict=True)]
        keep = [end - k + i for end, k in zip(itertools.accumulate(lengths), kept, strict=True) for i in range(k)]
        choices = [s.row for s in decoding + rows]
        started = time.perf_counter()
        with torch.no_grad(), frozen_factors(), packed_attention_on(self.model):
            with self._routing(choices, tuple(lengths)):
                hidden = body(input_ids=torch.tensor([ids], device=self.device), position_ids=layout.positions(),
                              cache=PackedView(self.caches[0], layout), packed=layout, use_cache=True)[0]
            with self._routing(choices, tuple(kept)):
                logits = head(hidden[:, keep])[0].float()  # (kept, V)
        self.cost.observe(len(ids), time.perf_counter() - started)
        for sequence, length in zip(decoding + rows, lengths, strict=True):
            sequence.cached += length
        ends = list(itertools.accumulate(kept))
        rows_logits = logits[[end - 1 for end in ends]]  # each row's logits after its last token
        everything = [logits[end - k:end] if a else None
                      for end, k, a in zip(ends[len(decoding):], kept[len(decoding):], keep_all, strict=True)]
        return PackedOutput(rows_logits[:len(decoding)], rows_logits[len(decoding):], everything)

    @property
    def packs(self) -> bool:
        """Whether this lane reads decode tokens and prompt chunks in one packed forward (the shared lane, on a
        model :func:`~.packed_batch.packed_parts` can split)."""
        return self.shared and packed_parts(self.model) is not None

    def _routing(self, choices: list[RowChoice], lengths: tuple[int, ...] | None = None):
        """The shared lane's per-row routing (or the base alone); a mixture routes itself."""
        if not self.shared or getattr(self.model, STATE_ATTR, None) is None:
            return contextlib.nullcontext()
        if all(choice is None for choice in choices):
            return disabled(self.model)
        return routed(self.model, PerRowRouting(tuple(choices), lengths))

    def _expert_weights(self, out, records) -> torch.Tensor | None:
        """Each token's expert weights ``(B, T, N)``: X-LoRA's scalings, or MixLoRA's router / MeteoRA's gate
        probabilities, averaged over the layers that route."""
        if self.passes == 2:
            return out.scalings.float().mean(dim=2)  # (B, T, L, N) -> (B, T, N)
        logits = list(records.get(ROUTER_LOGITS, [])) + [value for _, value in records.get(GATE_LOGITS, [])]
        if not logits:
            return None
        return torch.stack([torch.softmax(v.float(), dim=-1) for v in logits]).mean(dim=0)
