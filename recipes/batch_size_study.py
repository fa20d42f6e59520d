"""Batch-size study: the same N edits applied sequential-batched with batch sizes from 1 to N, per editor.

    python recipes/batch_size_study.py                                        # the YAML's CPU defaults
    python recipes/batch_size_study.py --editors [memit,emmet] --batch_sizes [1,8,32]
    python recipes/batch_size_study.py --data.limit 4096 --batch_sizes [16,64,256,1024,4096] \
        --model.model meta-llama/Meta-Llama-3-8B --out_dir results/batch_size_llama3     # the paper's scale (GPU)

For each editor of ``--editors`` (MEMIT, EMMET, AlphaEdit, LocFT-BF) and each batch size B of
``--batch_sizes`` (``0`` = all N records in one batch), the N records of ``--data`` are edited in
batches of B, one batch after another, every edit kept (strategy ``sequential`` for B = 1,
``sequential_batched`` otherwise): the closed-form editors solve one update per batch (data
batch = edit batch), LocFT-BF runs in rounds of B requests (``round_size``: each round its own
epochs, ``--locft_epochs``, over its chunk in mini-batches of ``--locft_minibatch``). ``rome``
in ``--editors`` adds sequential ROME (batch 1) as a reference. Each run (a *cell*) starts from
the unedited weights and is undone bit for bit after it.

A cell is scored twice:

* after all N edits (evaluation timing ``after-all``) with ``--eval.*`` against the unedited
  model: ES, PS, NS and S (probability), generation exact match, perplexity; with the time the
  edits took (``edit_seconds``, the curve's evaluations excluded). One row per cell in
  ``batch_sizes.csv``, appended as each cell finishes;
* during the run by a :class:`~lit_edit.evaluation.RetentionCurve` (``--curve.*``, timing
  ``retention``): ``<editor>_b<B>/retention.csv`` + ``.png``, and the per-batch diagnostics in
  ``<editor>_b<B>/edits.csv``.

Writes under ``--out_dir``: ``batch_sizes.csv`` / ``.md`` / ``.json`` (the table, printed, with the
unedited model's figures), ``batch_sizes.png`` (each figure against the batch size, log axis, a
line per editor; sequential ROME drawn flat across the batch sizes as the reference) and
``retention_<editor>.png`` (the curves of every batch size of an editor). Every row, file and
title names the editor, the strategy, the batch size, the evaluation timing, the model and the
data. Rerunning the same command resumes: finished cells are skipped, an interrupted cell
continues from its last checkpoint (``<editor>_b<B>/ckpt``), and the table and plots are redrawn.

The YAML's defaults fit a 2-core CPU in a couple of hours (32 edits, batch sizes 1, 4, 16, 32);
docs/long-runs.md ("Batch-size study") lists the settings of the paper's scale.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

from lit_edit.editors import EMMET, MEMIT, ROME, AlphaEdit, LocFTBF
from lit_edit.editors.closed_form import ClosedFormEditor
from lit_edit.evaluation import RetentionCurve
from lit_edit.io import atomic_write
from lit_edit.long_runs import (
    CURVE_SET,
    check_curve,
    check_restored,
    claim_run_dir,
    curve_args_of,
    ppl_column,
    read_csv,
    sequential_fit,
    settings_digest,
    snapshot,
)
from lit_edit.plots import series_plot
from lit_edit.progress import Progress
from lit_edit.study import Study, data_label

log = logging.getLogger("lit_edit.recipes.batch_size_study")
DEFAULTS = __file__.removesuffix(".py") + ".yaml"


EDITORS = {"rome": ROME, "memit": MEMIT, "emmet": EMMET, "alphaedit": AlphaEdit, "locft_bf": LocFTBF}
NAMES = {"rome": "ROME", "memit": "MEMIT", "emmet": "EMMET", "alphaedit": "AlphaEdit", "locft_bf": "LocFTBF"}
KEY = ("editor", "strategy", "batch_size", "model", "data")
#: Table column -> the figure it shows (``ppl`` = the perplexity figure, whatever its corpus).
FIGURES = {"ES": "prob/ES", "PS": "prob/PS", "NS": "prob/NS", "S": "prob/S", "gen_EM": "gen_em/reliability",
           "gen_EM_para": "gen_em/generalization", "ppl": "ppl/"}


def rounds_supported() -> bool:
    """Whether LocFT-BF can run in rounds (its ``round_size`` option)."""
    return "round_size" in inspect.signature(LocFTBF.__init__).parameters


def strategy_of(batch_size: int) -> str:
    return "sequential" if batch_size == 1 else "sequential_batched"


def _arguments(parser) -> None:
    parser.add_argument("--editors", type=list[str], default=["rome", "memit", "emmet", "alphaedit", "locft_bf"],
                        help=f"Editors: {', '.join(EDITORS)} (rome: sequential ROME, batch 1 only, as the reference).")
    parser.add_argument("--batch_sizes", type=list[int], default=[1, 4, 16, 0], help="Edit batch sizes (0 = all records).")
    parser.add_argument("--editor_args", type=dict, default={},
                        help="Per-editor settings over --model.* (e.g. {memit: {statistics: {update_weight: 15000}}, locft_bf: {lr: 1e-3}}).")
    parser.add_argument("--locft_epochs", type=int, default=25, help="LocFT-BF: epochs per round (its early stop may end a round sooner).")
    parser.add_argument("--locft_minibatch", type=int, default=16, help="LocFT-BF: mini-batch of a round (capped at the round's requests).")
    parser.add_class_arguments(RetentionCurve, "curve", skip=CURVE_SET)
    parser.set_defaults(out_dir="results/batch_size_study")


def _check(parser, cfg) -> None:
    bad = [e for e in cfg.editors if e not in EDITORS]
    if bad or not cfg.editors:
        parser.error(f"--editors {cfg.editors}: choose from {list(EDITORS)}")
    if len(set(cfg.editors)) != len(cfg.editors):
        parser.error(f"--editors {cfg.editors} names an editor twice")
    if not cfg.batch_sizes or any(b < 0 for b in cfg.batch_sizes):
        parser.error(f"--batch_sizes {cfg.batch_sizes}: give one or more sizes >= 1 (0 = all records)")
    unknown = [e for e in cfg.editor_args if e not in EDITORS]
    if unknown or not all(isinstance(v, dict) for v in cfg.editor_args.values()):
        parser.error(f"--editor_args: a mapping editor -> settings, editors from {list(EDITORS)}; got {cfg.editor_args!r}")
    if cfg.locft_epochs < 1 or cfg.locft_minibatch < 1:
        parser.error(f"--locft_epochs and --locft_minibatch must be >= 1, got {cfg.locft_epochs}, {cfg.locft_minibatch}")
    if not cfg.model.accumulate:
        parser.error("--model.accumulate must be true: the study keeps every batch's edit (sequential-batched)")
    if cfg.data.shuffle:
        parser.error("--data.shuffle must be false: every cell edits the records in the same order")
    check_curve(parser, cfg)


def cells(editors: list[str], batch_sizes: list[int], n: int) -> list[tuple[str, int]]:
    """The (editor, batch size) runs in order: ROME at batch 1 only; ``0`` = ``n``; sizes above
    ``n`` are an error; each size once."""
    sizes = list(dict.fromkeys(n if b == 0 else b for b in batch_sizes))
    over = [b for b in sizes if b > n]
    if over:
        raise ValueError(f"--batch_sizes {over} exceed the {n} records edited (0 = all records)")
    return [(e, b) for e in editors for b in ([1] if e == "rome" else sizes)]


def _figure(figures: dict[str, Any], name: str) -> float:
    if name.endswith("/"):
        name = next((k for k in figures if k.startswith(name)), name)
    try:
        return float(figures[name])
    except (KeyError, TypeError, ValueError):
        return math.nan


def main(args: Optional[list[str]] = None) -> list[dict[str, Any]]:
    study = Study.start(ClosedFormEditor, __doc__, DEFAULTS, args, table="batch_sizes.csv", key=KEY,
                        add_arguments=_arguments, check=_check)
    cfg, table = study.cfg, study.table
    requests = study.datamodule.load()
    if not requests:
        study.parser.error("--data selects no record")
    editors = list(cfg.editors)
    if "locft_bf" in editors and not rounds_supported():
        print("LocFT-BF skipped: this version of LocFTBF has no round_size option, so it cannot edit in sequential batches")
        editors.remove("locft_bf")
    try:
        runs = cells(editors, cfg.batch_sizes, len(requests))
    except ValueError as e:
        study.parser.error(str(e))
    curve_args = curve_args_of(cfg)
    data = data_label(cfg.data, len(requests))
    settings = settings_digest(cfg, skip=("out_dir", "trainer", "config", "__path__", "editors", "batch_sizes"))
    todo = [(e, b) for e, b in runs if not table.done(editor=NAMES[e], strategy=strategy_of(b), batch_size=b, model=study.model_name, data=data)]
    log.info("batch-size study: %d cell(s) to run, %d already done", len(todo), len(runs) - len(todo))

    before = study.unedited(requests)  # cached: a redraw or a resume evaluates nothing
    with Progress(len(todo), "batch-size cells", logger=log) as progress:
        for editor_name, b in todo:
            _run_cell(study, editor_name, b, requests, curve_args, data, settings, before)
            progress.update(editor=NAMES[editor_name], batch_size=b)

    return summarize(study, runs, data, before.figures)


def _run_cell(study: Study, editor_name: str, b: int, requests: list, curve_args: dict[str, Any], data: str,
              settings: dict[str, Any], before: Any) -> None:
    """Run (or resume) one cell: the sequential(-batched) fit with its curve, the after-all
    evaluation, the undo (checked bit for bit) and the table row."""
    cfg = study.cfg
    meta = {"editor": NAMES[editor_name], "strategy": strategy_of(b), "batch_size": b, "timing": "retention",
            "model": study.model_name, "data": data}
    run_dir = study.out / f"{editor_name}_b{b}"
    own = dict(cfg.editor_args.get(editor_name, {}))
    claim_run_dir(run_dir, {**settings, **meta, "editor_args": own})
    originals = snapshot(study.model)
    if editor_name == "locft_bf":
        editor = LocFTBF(model=study.model, tokenizer=study.tokenizer, round_size=b, accumulate=True, **own)
        fit = dict(batch_size=min(cfg.locft_minibatch, b), max_epochs=cfg.locft_epochs, rounds=True)
    else:
        editor = study.editor(EDITORS[editor_name], accumulate=True, **own)
        fit = dict(batch_size=b, max_epochs=1, rounds=False)
    log.info("%s, batches of %d (%s): %d record(s)", meta["editor"], b, meta["strategy"], len(requests))
    result = sequential_fit(study, editor, requests, fit["batch_size"], run_dir, curve_args, meta,
                            max_epochs=fit["max_epochs"], rounds=fit["rounds"])
    started = time.perf_counter()
    after = study.evaluator.evaluate(editor.model, editor.tokenizer, requests, reference=before.reference)
    eval_seconds = time.perf_counter() - started
    editor.restore()
    check_restored(editor, originals)
    row = {**meta, "timing": "after-all", "n_edits": len(requests),
           **{short: _figure(after.figures, name) for short, name in FIGURES.items()},
           "edit_seconds": result["edit_seconds"], "eval_seconds": eval_seconds,
           "curve_rows": len(result["curve"]), **after.figures}
    study.table.add(row)
    print(f"{meta['editor']} batch {b}: " + ", ".join(f"{k} {row[k]:.3f}" for k in FIGURES if isinstance(row[k], float)))


def summarize(study: Study, runs: list[tuple[str, int]], data: str, unedited: dict[str, float]) -> list[dict[str, Any]]:
    """Table (CSV kept, markdown and JSON written, printed) and plots of the finished cells."""
    wanted = {(NAMES[e], str(b)) for e, b in runs}
    rows = [r for r in study.table.rows if (r["editor"], str(r["batch_size"])) in wanted and r["model"] == study.model_name and r["data"] == data]
    order = {key: i for i, key in enumerate((NAMES[e], str(b)) for e, b in runs)}
    rows.sort(key=lambda r: order[(r["editor"], str(r["batch_size"]))])
    n = len(study.datamodule.load())
    title = (f"Batch-size study on {study.model_name}: {n} edits {data}, sequential-batched, "
             "after-all evaluation (time: the edits alone)")
    shown = [c for c in FIGURES if any(_number(r.get(c)) == _number(r.get(c)) for r in rows)]
    reference = {"editor": "(unedited)", "strategy": "-", "batch_size": "-", "timing": "after-all",
                 **{short: _figure(unedited, name) for short, name in FIGURES.items()}}
    columns = ["editor", "strategy", "batch_size", *shown, "edit_seconds"]
    study.finish([reference, *rows], columns, title, "batch_sizes")
    document = {"title": title, "model": study.model_name, "data": data, "n_edits": n, "timing": "after-all",
                "unedited": reference, "rows": rows}
    atomic_write(study.out / "batch_sizes.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1, default=str)))
    if rows:
        sizes = sorted({int(r["batch_size"]) for r in rows})
        plotted = []
        for r in rows:
            if r["editor"] == "ROME":  # the sequential reference, flat across the batch sizes
                plotted += [{**r, "series": "ROME (sequential, batch 1)", "batch_size": s} for s in sizes]
            else:
                plotted.append({**r, "series": r["editor"]})
        plotted += [{**reference, "series": "unedited", "batch_size": s} for s in sizes]
        series_plot(plotted, [*shown, "edit_seconds"], study.out / "batch_sizes.png", x_key="batch_size", series_key="series",
                    title=title, log_x=True, log_y=("edit_seconds",))
        for editor in dict.fromkeys(r["editor"] for r in rows):
            curves = []
            for r in rows:
                if r["editor"] == editor:
                    folder = next(e for e, name in NAMES.items() if name == editor)
                    curves += [{**c, "series": f"batch {r['batch_size']}"}
                               for c in read_csv(study.out / f"{folder}_b{r['batch_size']}" / "retention.csv")]
            ppl = ppl_column(curves)
            metrics = [m for m in ("prob/ES", "prob/PS", "prob/NS", "gen_em/reliability", ppl, "update_norm_total")
                       if m is not None and any(c.get(m) not in (None, "") for c in curves)]
            if metrics:
                series_plot(curves, metrics, study.out / f"retention_{editor}.png", x_key="edits_applied", series_key="series",
                            title=f"{editor} sequential(-batched) retention by batch size on {study.model_name}: {data}, retention evaluation")
    print(f"Wrote {study.out / 'batch_sizes.csv'}, batch_sizes.md, batch_sizes.json" + (", batch_sizes.png, retention_<editor>.png" if rows else ""))
    return rows


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


if __name__ == "__main__":
    main()
