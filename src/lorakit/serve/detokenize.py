"""A choice's text as its tokens arrive: released in safe pieces, cut at the first stop string.

The text so far is ``decode(tokens)`` (special tokens skipped, as ``generate`` decodes). A piece is
released only when it can no longer change: not while the text ends in an incomplete character
(``\\ufffd``, a multi-byte character split across tokens), and not while its end could be the start
of a stop string. The first stop string found ends the choice; the text returned stops before it.
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"


class TextStream:
    """The released text of one choice and whether a stop string ended it."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.released = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add ``token``; the newly released text (possibly empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith(INCOMPLETE):
            return ""
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        return self._release(text[: len(text) - self._held_back(text)])

    def finish(self) -> str:
        """The text still held back when the choice ends without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._release(text)

    def _release(self, text: str) -> str:
        piece = text[len(self.released):] if text.startswith(self.released) else ""
        self.released += piece
        return piece

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in ``text`` (searching only what could be new), or None."""
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, len(self.released) - longest)
        found = [index for index in (text.find(stop, start) for stop in self.stops) if index >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        return max((size for stop in self.stops for size in range(min(len(stop) - 1, len(text)), 0, -1)
                    if stop.startswith(text[-size:])), default=0)
