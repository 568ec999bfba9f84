"""What the engine reports as it runs, for metrics: queue depth, batch size, latencies, token counts.

The engine calls these hooks on its own thread; :class:`EngineObserver` ignores them, and the server's
Prometheus metrics (:mod:`lorakit.serve.metrics`) record them.
"""

from __future__ import annotations


class EngineObserver:
    """Hooks the engine calls; each does nothing here."""

    def queued(self, depth: int) -> None:
        """The number of requests waiting to start changed to ``depth``."""

    def batch(self, size: int) -> None:
        """A step ran ``size`` sequences (decoding and prefilling)."""

    def first_token(self, seconds: float) -> None:
        """A choice produced its first token ``seconds`` after its request arrived."""

    def token_gap(self, seconds: float) -> None:
        """A choice produced another token ``seconds`` after its previous one."""

    def tokens(self, prompt: int, completion: int) -> None:
        """A request ended having read ``prompt`` tokens and generated ``completion`` tokens."""
