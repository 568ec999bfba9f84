"""Line plots of curves that share an x axis (loss per step, one line per run), as a PNG file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lorakit.analysis.plots import matplotlib_classes
from lorakit.errors import DataError
from lorakit.io.files import write_atomically


def line_plot(curves: Mapping[str, Sequence[float]], *, title: str, path: str | Path, xlabel: str, ylabel: str,
              reference: float | None = None, reference_label: str = "", x: Sequence[float] | None = None) -> Path:
    """Draw each named curve against ``x`` (default 1, 2, ...; a dashed horizontal line at ``reference`` if given)."""
    if not curves or any(len(values) == 0 for values in curves.values()):
        raise DataError("a line plot needs at least one curve, and every curve needs at least one value")
    if x is not None and any(len(values) != len(x) for values in curves.values()):
        raise DataError(f"a line plot with {len(x)} x values needs curves of {len(x)} values")
    figure_type, canvas_type = matplotlib_classes()
    figure = figure_type(figsize=(8.0, 5.0), dpi=100, layout="constrained")
    canvas_type(figure)
    axes = figure.add_subplot()
    for name, values in curves.items():
        axes.plot(list(x) if x is not None else range(1, len(values) + 1), list(values), label=name, linewidth=1.4,
                  marker="o" if x is not None else None, markersize=3)
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle="--", linewidth=0.9, label=reference_label or None)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    target = Path(path)
    write_atomically(target, lambda tmp: figure.savefig(tmp, format="png"))
    return target
