"""Reusable plots written as PNG files: ``heatmap(matrix, rows, cols, title=..., path=...)``.

matplotlib is optional and imported only when a plot is drawn. Figures are drawn on matplotlib's
Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never through ``pyplot``: that needs no
display, leaves the user's own backend alone and keeps no global figure state. Files are written
to a temporary file beside the target and renamed onto it, so a crash never leaves half a PNG.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import DataError, LorakitError
from lorakit.io.files import write_atomically

MAX_LABELS = 120
"""At most this many tick labels on an axis; beyond it only every k-th row is labelled (for module
paths, k is chosen so that every labelled row is the same module of a layer)."""
MAX_ANNOTATED_CELLS = 400
"""Cells are annotated with their value when the matrix has at most this many (and <= 40 rows)."""
INSTALL_HINT = "pip install matplotlib"

# A dotted module path with a numeric component (a layer index): ``model.layers.3.self_attn.q_proj``.
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*\.\d+(\.\w+)*\.[A-Za-z_]\w*$")


class MissingDependencyError(LorakitError, ImportError):
    """An optional package that a feature needs is not installed; the message says how to install it."""


def heatmap(matrix: Any, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str,
            path: str | Path, colorbar_label: str, row_title: str | None = None,
            col_title: str | None = None) -> Path:
    """Draw ``matrix`` (rows x cols: a tensor, array or nested list) as a heatmap PNG at ``path``.

    Module paths among the labels are shortened (``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``);
    with more than ``MAX_LABELS`` rows only every k-th row is labelled; small matrices get their
    values written in the cells. The colour scale spans the data's range (a colour bar gives it).
    Returns ``path``.
    """
    values = _as_matrix(matrix)
    rows, cols = values.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise DataError(f"heatmap of a {rows} x {cols} matrix got {len(row_labels)} row labels and "
                        f"{len(col_labels)} column labels; give one label per row and per column")
    figure_type, canvas_type = matplotlib_classes()
    width = min(4.0 + 0.9 * cols, 16.0)
    height = 2.0 + (0.24 if rows <= 40 else 0.16) * min(rows, MAX_LABELS)
    figure = figure_type(figsize=(width, height), dpi=100, layout="constrained")
    canvas_type(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=colorbar_label, fraction=min(0.08, 0.4 / width), pad=0.02)
    _label_axis(axes, "x", shorten_labels(col_labels), 1)
    period = layer_period(row_labels)
    step = _label_axis(axes, "y", shorten_labels(row_labels), period or 1)
    if period:  # thin white lines between the layers
        for boundary in range(period, rows, period):
            axes.axhline(boundary - 0.5, color="white", linewidth=0.8)
    axes.set_title(title)
    axes.set_ylabel(_row_title(row_title, row_labels, step, period))
    if col_title:
        axes.set_xlabel(col_title)
    if rows * cols <= MAX_ANNOTATED_CELLS and rows <= 40:
        _annotate(axes, values, image)
    target = Path(path)
    write_atomically(target, lambda tmp: figure.savefig(tmp, format="png"))
    return target


def shorten_labels(labels: Sequence[str]) -> list[str]:
    """Module paths shortened to ``<layer index>.<module>``; other labels (tokens, experts) kept.

    If shortening would make two labels equal, the module paths lose only their common prefix.
    """
    short = [_short_module(label) for label in labels]
    if len(set(short)) == len(set(labels)):
        return short
    paths = [label for label in labels if _MODULE_PATH.match(label)]
    prefix = _common_dotted_prefix(paths)
    return [label[len(prefix):] if label in paths and prefix else label for label in labels]


def _short_module(label: str) -> str:
    if not _MODULE_PATH.match(label):
        return label
    parts = label.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    return f"{parts[index]}.{parts[-1]}"


def _common_dotted_prefix(paths: Sequence[str]) -> str:
    if len(paths) < 2:
        return ""
    split = [path.split(".") for path in paths]
    common = 0
    while all(len(parts) > common + 1 and parts[common] == split[0][common] for parts in split):
        common += 1
    return ".".join(split[0][:common]) + "." if common else ""


def _as_matrix(matrix: Any) -> np.ndarray:
    if hasattr(matrix, "detach"):  # a torch tensor, possibly on a GPU or in bfloat16
        matrix = matrix.detach().float().cpu().numpy()
    values = np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2 or 0 in values.shape:
        raise DataError(f"a heatmap needs a non-empty 2-D matrix, got shape {tuple(values.shape)}")
    return values


def layer_period(labels: Sequence[str]) -> int | None:
    """``p`` when the labels are module paths in layers of ``p`` consecutive rows each (p >= 2).

    ``model.layers.{0,1}.{q,v}_proj`` has period 2; ``None`` for anything else (tokens, ragged layers).
    """
    if len(labels) < 4 or not all(_MODULE_PATH.match(label) for label in labels):
        return None
    layers = [next(part for part in label.split(".") if part.isdigit()) for label in labels]
    period = next((i for i in range(1, len(layers)) if layers[i] != layers[0]), len(layers))
    same = all(layers[i] == layers[i - i % period] for i in range(len(layers)))
    starts = layers[::period]
    if period < 2 or len(layers) % period or not same or len(set(starts)) != len(starts):
        return None
    return period


def _label_axis(axes: Any, axis: str, labels: list[str], period: int) -> int:
    """Tick labels on ``axis``, every k-th one when there are more than ``MAX_LABELS``; returns k.

    k is a divisor or a multiple of ``period`` so that the labelled rows line up with the layers.
    """
    needed = -(-len(labels) // MAX_LABELS)  # ceil
    divisors = [d for d in range(1, period + 1) if period % d == 0 and d >= needed]
    step = divisors[0] if divisors else period * -(-needed // period)
    positions = list(range(0, len(labels), step))
    shown = [labels[i] for i in positions]
    size = 8 if len(positions) <= 40 else 7
    if axis == "x":
        long = max(len(label) for label in shown) > 6 or len(shown) > 12
        axes.set_xticks(positions, shown, fontsize=size, rotation=45 if long else 0,
                        ha="right" if long else "center", rotation_mode="anchor")
    else:
        axes.set_yticks(positions, shown, fontsize=size)
        if step > 1:
            axes.set_yticks(range(len(labels)), minor=True)
    return step


def _row_title(title: str | None, labels: Sequence[str], step: int, period: int | None) -> str:
    """The y-axis title; when rows are thinned it says so and names the modules of each layer."""
    lines = [title or ""]
    if step > 1:
        lines[0] = f"{lines[0]} (every {_ordinal(step)} labelled)".strip()
    if period and step > 1:  # name the unlabelled rows: the modules of each layer, in order
        lines.append("each layer: " + ", ".join(label.rsplit(".", 1)[-1] for label in labels[:period]))
    return "\n".join(lines)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _annotate(axes: Any, values: np.ndarray, image: Any) -> None:
    """Write each cell's value in it, dark on light cells and light on dark ones."""
    low, high = image.get_clim()
    middle = (low + high) / 2
    size = 7
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=size,
                      color="black" if value > middle else "white")


def matplotlib_classes() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or a :class:`MissingDependencyError` saying how to install them."""
    try:
        import matplotlib  # noqa: F401  (imported first so that a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingDependencyError(f"plotting needs matplotlib, which is not installed ({err}); "
                                     f"install it with: {INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg
