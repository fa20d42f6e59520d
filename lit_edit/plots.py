"""Plots of study tables (matplotlib, from the ``plot`` extra): heatmaps and line plots, saved as PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["curve_plot", "heatmap", "line_plot", "series_plot"]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the "plot" extra
        raise ImportError("plots need matplotlib: pip install 'lit-edit[plot]'") from e
    return plt


def _save(plt: Any, fig: Any, path: Path, title: str) -> Path:
    """Title, lay out, write (PNG) and close a figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # PNG whatever the name (atomic writers save under a temporary one)
    plt.close(fig)
    return Path(path)


def heatmap(
    rows: list[dict[str, Any]],
    metrics: Sequence[str],
    path: Path,
    row_key: str = "module",
    col_key: str = "layer",
    reference: Optional[dict[str, float]] = None,
    title: str = "",
) -> Path:
    """One heatmap panel per metric: ``row_key`` × ``col_key`` (reference value in the title)."""
    plt = _pyplot()
    row_labels = list(dict.fromkeys(str(r[row_key]) for r in rows))
    col_labels = sorted({int(r[col_key]) for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.5 * len(row_labels) + 2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        grid = [[math.nan for _ in col_labels] for _ in row_labels]
        for r in rows:
            grid[row_labels.index(str(r[row_key]))][col_labels.index(int(r[col_key]))] = _number(r.get(metric))
        cmap = "viridis_r" if metric == "perplexity" else "viridis"
        im = ax.imshow(grid, aspect="auto", cmap=cmap)
        ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.set_xlabel(col_key)
        ref = f" (unedited {reference[metric]:.3g})" if reference and metric in reference else ""
        ax.set_title(metric + ref, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    level = float(im.norm(v))  # dark text on the bright (yellow) end of the colormap
                    bright = level > 0.6 if cmap == "viridis" else level < 0.4
                    label = f"{v:.2f}" if v < 100 else f"{v:.0f}"
                    ax.text(j, i, label, ha="center", va="center", fontsize=7, color="k" if bright else "w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(plt, fig, path, title)


def line_plot(
    rows: list[dict[str, Any]],
    metrics: Sequence[str],
    path: Path,
    x_key: str = "n_edits",
    series_key: str = "method",
    title: str = "",
    reference_series: Optional[str] = None,
) -> Path:
    """One panel per metric: value against ``x_key``, a line per ``series_key``.

    Rows whose series is ``reference_series`` (e.g. the unedited model measured at each N) are
    drawn as a grey dashed line.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    series = list(dict.fromkeys(str(r[series_key]) for r in rows))
    for ax, metric in zip(axes[0], metrics):
        for s in series:
            pts = sorted((int(r[x_key]), float(r[metric])) for r in rows if str(r[series_key]) == s)
            style = {"color": "grey", "linestyle": "--", "linewidth": 1} if s == reference_series else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s, **style)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(x_key)
    axes[0][0].legend(fontsize=7)
    return _save(plt, fig, path, title)


def curve_plot(
    rows: list[dict[str, Any]],
    panels: Union[Mapping[str, Sequence[str]], Sequence[str]],
    path: Path,
    x_key: str = "edits_applied",
    title: str = "",
    log_scale: Sequence[str] = (),
    columns: int = 4,
) -> Path:
    """Values of one run against ``x_key`` (a retention curve): one panel per entry of
    ``panels`` (a title → the metrics drawn in it as lines, or a list of metrics, one panel
    each). Missing or non-numeric values are skipped; panels whose title is in ``log_scale``
    (e.g. condition numbers) get a logarithmic y axis. Panels wrap after ``columns``."""
    plt = _pyplot()
    groups = dict(panels) if isinstance(panels, Mapping) else {m: [m] for m in panels}
    if not groups:
        raise ValueError("curve_plot needs at least one panel")
    ncols = min(columns, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for i, (name, metrics) in enumerate(groups.items()):
        ax = axes[i // ncols][i % ncols]
        positive = False
        for metric in metrics:
            pts = sorted((_number(r.get(x_key)), _number(r.get(metric))) for r in rows)
            pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
            positive = positive or any(y > 0 for _, y in pts)
            style = {"linestyle": "--"} if metric.startswith("first/") else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=metric, **style)
        if name in log_scale and positive:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        if len(metrics) > 1:
            ax.legend(fontsize=6)
    for j in range(len(groups), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _save(plt, fig, path, title)


def series_plot(
    rows: list[dict[str, Any]],
    metrics: Sequence[str],
    path: Path,
    x_key: str,
    series_key: str,
    title: str = "",
    log_x: bool = False,
    log_y: Sequence[str] = (),
    columns: int = 4,
) -> Path:
    """One panel per metric: value against ``x_key``, a line per value of ``series_key`` (e.g. two
    editor variants against the edits applied, or editors against the batch size).

    Missing or non-numeric values are skipped (a figure one series lacks leaves no point), so
    rows read back from a CSV can be passed as they are. ``log_x`` draws ``x_key`` on a base-2
    logarithmic axis (batch sizes 1, 4, 16, ...); metrics in ``log_y`` get a logarithmic y axis
    when they have positive values. Panels wrap after ``columns``."""
    plt = _pyplot()
    if not metrics:
        raise ValueError("series_plot needs at least one metric")
    ncols = min(columns, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    series = list(dict.fromkeys(str(r.get(series_key)) for r in rows))
    for i, metric in enumerate(metrics):
        ax = axes[i // ncols][i % ncols]
        positive = False
        for s in series:
            pts = sorted((_number(r.get(x_key)), _number(r.get(metric))) for r in rows if str(r.get(series_key)) == s)
            pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
            if not pts:
                continue
            positive = positive or any(y > 0 for _, y in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=s)
        if log_x:
            ax.set_xscale("log", base=2)
        if metric in log_y and positive:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        if ax.lines:
            ax.legend(fontsize=6)
    for j in range(len(metrics), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _save(plt, fig, path, title)
