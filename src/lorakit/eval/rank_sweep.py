"""DyLoRA's payoff measured: one trained adapter evaluated at every rank, without retraining
(:func:`lorakit.methods.dylora.at_rank` truncates it in place for each evaluation)."""

from __future__ import annotations

from torch import nn

from lorakit.eval.exact_match import EvalResult, evaluate
from lorakit.methods.dylora import at_rank, max_rank


def evaluate_ranks(model: nn.Module, tokenizer, examples, ranks=None, *, name: str = "default",
                   **options) -> dict[int, EvalResult]:
    """Evaluate adapter ``name`` at each rank of ``ranks`` (default: every rank ``1..r``) from one trained
    adapter, without retraining; ``options`` go to :func:`lorakit.eval.exact_match.evaluate`."""
    chosen = list(ranks) if ranks is not None else list(range(1, max_rank(model, name) + 1))
    results = {}
    for rank in chosen:
        with at_rank(model, rank, name):
            results[rank] = evaluate(model, tokenizer, examples, **options)
    return results
