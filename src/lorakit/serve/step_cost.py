"""What a forward of a lane costs, learnt from the forwards it ran: ``seconds ~ read + per_token * tokens``.

``read`` is what any forward pays whatever it reads (on a CPU, mostly reading the weights once);
``per_token`` is the arithmetic of one more token. The fit is least squares over the recent forwards,
each older one weighing ``FORGET`` times less, so it follows the machine (other load, longer contexts)
without a calibration run. The scheduler sizes prompt chunks with it (:meth:`StepCost.tokens_for`).
"""

from __future__ import annotations

FORGET = 0.95
"""Weight of a forward relative to the one after it."""


class StepCost:
    """An online linear fit of a lane's forward time against the tokens it read."""

    def __init__(self) -> None:
        self._weight = self._tokens = self._seconds = self._square = self._product = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        """One forward read ``tokens`` tokens (every row's, padding included) in ``seconds``."""
        self._weight = FORGET * self._weight + 1.0
        self._tokens = FORGET * self._tokens + tokens
        self._seconds = FORGET * self._seconds + seconds
        self._square = FORGET * self._square + tokens * tokens
        self._product = FORGET * self._product + tokens * seconds

    def fit(self) -> tuple[float, float] | None:
        """``(read, per_token)`` in seconds, or None until forwards of different sizes were seen."""
        if self._weight == 0:
            return None
        mean_tokens, mean_seconds = self._tokens / self._weight, self._seconds / self._weight
        spread = self._square / self._weight - mean_tokens ** 2
        if spread < 1.0:
            return None
        per_token = (self._product / self._weight - mean_tokens * mean_seconds) / spread
        if per_token <= 0:
            return None
        return max(0.0, mean_seconds - per_token * mean_tokens), per_token

    def tokens_for(self, seconds: float, *, own_forward: bool) -> int | None:
        """How many tokens fit in ``seconds`` more: added to a forward that runs anyway, or (``own_forward``)
        in a forward of their own, which pays ``read`` too. None while the fit is unknown."""
        fitted = self.fit()
        if fitted is None:
            return None
        read, per_token = fitted
        return max(0, int((seconds - (read if own_forward else 0.0)) / per_token))

    def seconds(self, tokens: int) -> float | None:
        """The predicted time of a forward reading ``tokens`` tokens; None while the fit is unknown."""
        fitted = self.fit()
        return None if fitted is None else fitted[0] + fitted[1] * tokens
