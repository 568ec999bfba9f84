"""``lorakit compare``: every method of :mod:`lorakit.jobs.method_runs` trained on one task with one budget,
then one report (:mod:`lorakit.jobs.compare_report`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from lorakit.errors import ConfigError
from lorakit.jobs.compare_report import write_report
from lorakit.jobs.method_runs import DEFAULT_METHODS, PRESETS, MethodResult, compare_method


def compare_methods(data: str, out: str | Path, *, methods: Sequence[str] = DEFAULT_METHODS,
                    train_flags: Sequence[str] = (), eval_n: int = 50, target_loss: float = 0.5,
                    base: str = "smollm2-135m", progress: bool = True) -> list[MethodResult]:
    """Run :func:`compare_method` for each of ``methods`` and write ``results.json``, ``methods.md`` and
    ``loss_curves.png`` to ``out``."""
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}: one of {', '.join(PRESETS)}")
    out = Path(out)
    results = []
    for method in tqdm(methods, desc="compare", unit="method", disable=not progress):
        results.append(compare_method(method, data, out, train_flags=train_flags, eval_n=eval_n,
                                      target_loss=target_loss, base=base))
    write_report(results, out, data=data, train_flags=train_flags, eval_n=eval_n, target_loss=target_loss)
    return results
