"""Writing an analysis report to a directory: ``analysis.json``, ``report.md`` and PNG plots.

Plots: ``spectra.png`` (each module type's singular values, normalised by the largest and averaged
over layers), ``intruders_vs_epsilon.png`` (the total intruder count over the ε sweep) and
``intruders_by_layer.png`` / ``norm_by_layer.png`` (layer x module type heatmaps of the intruder count
at ε and of ``||ΔW|| / ||W_0||``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lorakit.analysis.curves import line_plot
from lorakit.analysis.plots import heatmap
from lorakit.io.files import save_json, write_atomically

REPORT_FILES = ("analysis.json", "report.md", "spectra.png", "intruders_vs_epsilon.png", "intruders_by_layer.png",
                "norm_by_layer.png")


def layer_and_type(module: str) -> tuple[str, str]:
    """``("3", "q_proj")`` for ``model.layers.3.self_attn.q_proj``; ``("-", name)`` outside numbered layers."""
    parts = module.split(".")
    layer = next((part for part in parts if part.isdigit()), "-")
    return layer, parts[-1]


def _grid(modules: list[dict], value: Callable[[dict], float]) -> tuple[list[list[float]], list[str], list[str]]:
    """``value`` per (layer, module type) as a matrix, rows in numeric layer order; missing cells are 0."""
    cells = {layer_and_type(m["module"]): value(m) for m in modules}
    layers = sorted({layer for layer, _ in cells}, key=lambda layer: int(layer) if layer.isdigit() else -1)
    types = list(dict.fromkeys(kind for _, kind in cells))
    return [[cells.get((layer, kind), 0.0) for kind in types] for layer in layers], layers, types


def _mean_spectra(modules: list[dict]) -> dict[str, list[float]]:
    by_type: dict[str, list[list[float]]] = {}
    for m in modules:
        values = m["singular_values"]
        if values and values[0] > 0:
            by_type.setdefault(layer_and_type(m["module"])[1], []).append([v / values[0] for v in values])
    return {kind: [sum(column) / len(column) for column in zip(*rows, strict=False)] for kind, rows in by_type.items()}


def write_report(report: dict, out: str | Path) -> Path:
    """Write the report's JSON, markdown and plots under ``out`` (created); returns ``out``."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    save_json(directory / "analysis.json", report)
    write_atomically(directory / "report.md", lambda tmp: tmp.write_text(markdown(report)))
    modules, settings = report["modules"], report["settings"]
    line_plot(_mean_spectra(modules), title="singular values of ΔW (each / the largest, mean over layers)",
              path=directory / "spectra.png", xlabel="index", ylabel="σ_i / σ_1")
    line_plot({"intruders": [row["intruders"] for row in report["totals"]["intruders_by_epsilon"]]},
              title=f"intruder dimensions (top {settings['top_k']} per matrix) vs ε",
              path=directory / "intruders_vs_epsilon.png", xlabel="ε", ylabel="count", x=settings["epsilons"])
    for name, value, label in (("intruders_by_layer.png", lambda m: m["intruders"], f"intruders at ε = "
                                f"{settings['epsilon']:g}"),
                               ("norm_by_layer.png", lambda m: m["relative_norm"], "||ΔW|| / ||W0||")):
        matrix, layers, types = _grid(modules, value)
        heatmap(matrix, layers, types, title=label, path=directory / name, colorbar_label=label, row_title="layer",
                col_title="module")
    return directory


def markdown(report: dict) -> str:
    """The report as markdown: totals, the ε sweep, a per-module-type table, the overlap if any."""
    totals, settings = report["totals"], report["settings"]
    lines = [f"# What `{report['subject']['path']}` changed", "",
             f"{report['subject']['kind']} on base `{report['base']}`: {totals['modules']} linear modules analysed"
             f" ({len(report['skipped'])} skipped); ||ΔW||_F over all = {totals['norm']:.4g}; mean effective "
             f"rank {totals['mean_effective_rank']:.2f}; intruder dimensions (top {settings['top_k']}, "
             f"ε = {settings['epsilon']:g}): **{totals['intruders']}**.", "",
             "| ε | " + " | ".join(f"{row['epsilon']:g}" for row in totals["intruders_by_epsilon"]) + " |",
             "|---|" + "---|" * len(totals["intruders_by_epsilon"]),
             "| intruders | " + " | ".join(str(row["intruders"]) for row in totals["intruders_by_epsilon"]) + " |",
             "", "| module type | modules | mean ‖ΔW‖/‖W0‖ | mean effective rank | intruders |",
             "|---|---|---|---|---|"]
    by_type: dict[str, list[dict]] = {}
    for m in report["modules"]:
        by_type.setdefault(layer_and_type(m["module"])[1], []).append(m)
    for kind, rows in by_type.items():
        lines.append(f"| {kind} | {len(rows)} | {sum(r['relative_norm'] for r in rows) / len(rows):.4g} | "
                     f"{sum(r['effective_rank'] for r in rows) / len(rows):.2f} | "
                     f"{sum(r['intruders'] for r in rows)} |")
    if report["against"]:
        against = report["against"]
        lines += ["", f"Overlap with `{against['path']}` ({against['kind']}) over {len(against['modules'])} shared "
                      f"modules, top {against['rank']} directions: left (output side) {against['mean_left']:.3f}, "
                      f"right (input side) {against['mean_right']:.3f} (1 = same subspace, 0 = orthogonal)."]
    lines += ["", "Plots: spectra.png, intruders_vs_epsilon.png, intruders_by_layer.png, norm_by_layer.png; "
                  "every number: analysis.json.", ""]
    return "\n".join(lines)


def load_report(path: str | Path) -> dict:
    """A report written by :func:`write_report` (its ``analysis.json``), checked against the schema."""
    from lorakit.analysis.report_schema import check_report
    report = json.loads((Path(path) / "analysis.json").read_text())
    check_report(report)
    return report
