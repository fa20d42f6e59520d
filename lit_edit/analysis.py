"""Studies over editors: tuning-location sweeps and pipeline comparisons.

Both studies load the model once, edit it many times (restoring bit-exactly in between), score
every run with the same :class:`~lit_edit.evaluation.EditEvaluation` against the same unedited
reference, and append each finished run to a CSV as soon as it ends, so an interrupted study
resumes where it stopped (finished rows are skipped, never repeated).
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L

from lit_edit.data.request import EditRequest
from lit_edit.editors.base import Editor
from lit_edit.io import atomic_write
from lit_edit.models import ArchSpec

log = logging.getLogger(__name__)

__all__ = [
    "LOCATION_KINDS",
    "location_mask",
    "ResumableTable",
    "fit_and_score",
    "edit_score",
    "study_column",
    "write_markdown",
    "heatmap",
    "line_plot",
]

#: Locations a sweep can visit inside block ``i``.
LOCATION_KINDS = ("attn_out", "mlp_up", "mlp_gate", "mlp_down", "block")

#: The figures location/pipeline studies report: generation exact match when that protocol ran,
#: else teacher-forced token accuracy; plus perplexity.
STUDY_FIGURES = {
    "reliability": ("gen_em/reliability", "tok_acc/reliability"),
    "generalization": ("gen_em/generalization", "tok_acc/generalization"),
    "locality": ("gen_em/locality_agreement", "tok_acc/locality"),
    "perplexity": ("ppl/",),
}


def location_mask(arch: ArchSpec, kind: str, layer: int) -> dict[str, Any]:
    """``target_modules``/``layers_to_transform`` for a named location of block ``layer``."""
    if kind == "block":
        return {"target_modules": rf"{re.escape(arch.layers)}\.{layer}\..+", "layers_to_transform": None}
    kinds = arch.kinds()
    if kind not in kinds:
        raise KeyError(f"location {kind!r} does not exist for this architecture; available: {sorted(kinds) + ['block']}")
    return {"target_modules": [kinds[kind]], "layers_to_transform": [layer]}


class ResumableTable:
    """A CSV of finished runs keyed by some columns; rows are appended (and flushed) one by one."""

    def __init__(self, path: Path, key: Sequence[str]):
        self.path = Path(path)
        self.key = tuple(key)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open() as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]
            log.info("resuming: %d finished run(s) in %s", len(self.rows), self.path)

    def _key_of(self, row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in self.key)

    def done(self, **key: Any) -> bool:
        target = tuple(str(key[k]) for k in self.key)
        return any(self._key_of(r) == target for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({k: row[k] for k in row})
        columns = list(dict.fromkeys(c for r in self.rows for c in r))

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)


def fit_and_score(
    editor: Editor,
    requests: list[EditRequest],
    datamodule: L.LightningDataModule,
    evaluator: Any,
    reference: Any,
    trainer_kwargs: dict[str, Any],
) -> dict[str, float]:
    """Fit ``editor``, evaluate after all edits against ``reference``, restore; return the figures."""
    import time

    trainer = L.Trainer(
        **{
            "accelerator": "auto",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            **trainer_kwargs,
        }
    )
    started = time.perf_counter()
    trainer.fit(editor, datamodule=datamodule)
    seconds = time.perf_counter() - started
    figures = evaluator.evaluate(editor.model, editor.tokenizer, requests, reference=reference)
    figures["edit_seconds"] = seconds
    figures["epochs_run"] = float(trainer.current_epoch)
    figures["optimizer_steps"] = float(getattr(editor, "optimizer_steps", math.nan))
    editor.restore()
    return figures


def edit_score(
    row: dict[str, Any],
    ppl_before: float,
    ppl_tolerance: float = 0.10,
    locality_key: str = "locality",
) -> float:
    """Harmonic mean of reliability, generalization and locality; 0 if perplexity rose > tolerance.

    ``locality_key`` names the row's locality figure (``locality`` is the study's headline one,
    e.g. generation agreement; ``tok_acc/locality`` the teacher-forced token agreement). A
    missing or non-numeric figure gives ``nan``: the row cannot be ranked.
    """
    values = [_number(row.get(key)) for key in ("reliability", "generalization", locality_key, "perplexity")]
    if any(math.isnan(v) for v in values):
        return math.nan
    *scores, ppl = values
    if any(v <= 0 for v in scores):
        return 0.0
    if ppl > ppl_before * (1 + ppl_tolerance):
        return 0.0
    return len(scores) / sum(1 / v for v in scores)


def _number(value: Any) -> float:
    """``value`` as a float; ``nan`` for a missing or empty cell (a column older runs lack)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "nan"
    return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"


def protocol_label(evaluator: Any) -> str:
    """How the study figures were measured, for table titles."""
    return "generation exact match" if "generation" in evaluator.protocols else "teacher-forced token accuracy"


def write_markdown(rows: list[dict[str, Any]], columns: Sequence[str], path: Path, title: str = "") -> str:
    """A markdown table of ``rows`` (also returned as text)."""
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


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
    fig.savefig(path, dpi=120)
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


def _figure_name(figures: dict[str, float], short: str) -> str:
    if short == "perplexity":  # ppl/<corpus>
        return next((k for k in figures if k.startswith("ppl/")), "ppl/wiki")
    return next((name for name in STUDY_FIGURES[short] if name in figures), STUDY_FIGURES[short][0])


def study_row(figures: dict[str, float], **key: Any) -> dict[str, Any]:
    """A table row: the key columns, the four study figures, then every other figure."""
    row: dict[str, Any] = dict(key)
    used = set()
    for short in STUDY_FIGURES:
        name = _figure_name(figures, short)
        used.add(name)
        row[short] = figures.get(name, math.nan)
    for name, value in figures.items():
        if name not in used:
            row[name] = value
    return row


def study_column(figures: dict[str, float], figure: str) -> str:
    """The column of :func:`study_row` that holds ``figure``: its short name if it is the one the
    study reports there (e.g. ``locality`` for ``gen_em/locality_agreement`` when generation
    ran), else the figure's own name."""
    return next((short for short in STUDY_FIGURES if _figure_name(figures, short) == figure), figure)


def reference_row(figures: dict[str, float]) -> dict[str, float]:
    return {short: figures.get(_figure_name(figures, short), math.nan) for short in STUDY_FIGURES}

