"""The report of ``lorakit compare``: ``results.json``, a markdown table (``methods.md``) and the loss
curves of every method in one plot (``loss_curves.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lorakit.analysis.curves import line_plot
from lorakit.io.files import save_json, write_atomically
from lorakit.jobs.method_runs import PRESETS, SMOOTHING, MethodResult, smoothed

PLOT_FILE = "loss_curves.png"


def results_table(results: Sequence[MethodResult], target_loss: float) -> str:
    """The markdown table of the results, one row per method."""
    lines = [f"| method | final loss | steps to loss {target_loss:g} | held-out exact match | trainable parameters "
             "| s / step | set-up s | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        reached = r.steps_to_target if r.steps_to_target is not None else f"not in {len(r.losses)}"
        lines.append(f"| {r.method} | {r.final_loss:.3f} | {reached} | {r.exact_match:.0%} | "
                     f"{r.trainable_parameters:,} | {r.seconds_per_step:.2f} | {r.setup_seconds:.0f} | "
                     f"{r.peak_memory_mb:,.0f} |")
    return "\n".join(lines)


def write_report(results: Sequence[MethodResult], out: Path, *, data: str, train_flags: Sequence[str], eval_n: int,
                 target_loss: float) -> None:
    """Write the three report files to ``out``."""
    save_json(out / "results.json", {"data": data, "train_flags": list(train_flags), "eval_n": eval_n,
                                     "target_loss": target_loss, "results": [asdict(r) for r in results]})
    line_plot({r.method: smoothed(r.losses) for r in results}, path=out / PLOT_FILE, xlabel="step",
              ylabel=f"training loss (mean of the last {SMOOTHING} steps)", title=f"Training loss on {data}",
              reference=target_loss, reference_label=f"target {target_loss:g}")
    methods = "\n".join(f"- **{r.method}**: {PRESETS[r.method].summary}. `{r.command}`" for r in results)
    text = (f"# Methods compared on {data}\n\n{results_table(results, target_loss)}\n\n![loss curves]({PLOT_FILE})\n\n"
            f"Held-out exact match on {eval_n} test examples. Commands:\n\n{methods}\n")
    write_atomically(out / "methods.md", lambda tmp: tmp.write_text(text))
