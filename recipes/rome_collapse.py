"""Collapse study of sequential ROME: original ROME keys against r-ROME keys, a retention curve each.

    python recipes/rome_collapse.py                                    # both variants, the YAML's CPU defaults
    python recipes/rome_collapse.py --data.limit 2000 --curve.every 100 --out_dir results/rome_collapse_2k
    python recipes/rome_collapse.py --variants [r-rome]                # one variant

ROME edits the records one at a time and keeps every edit (strategy ``sequential``, batch 1),
once with the original ROME keys (``original_rome: true``: the bare prompt's key in W k and in
the denominator) and once with the r-ROME keys (``original_rome: false``: the averaged key
everywhere), from the same unedited weights. A
:class:`~lit_edit.evaluation.RetentionCurve` (``--curve.*``) scores each run every
``--curve.every`` edits (evaluation timing ``retention``): all edits applied so far
(probability ES/PS, generation exact match), a fixed locality set and a fixed perplexity set,
the cumulative update ‖W − W₀‖ and ROME's denominator of the last edit. Every edit's own update
norm and denominator are logged as well (``<variant>/edits.csv``).

Writes under ``--out_dir``:

* ``<variant>/retention.csv`` + ``.png``: the curve of each variant; ``<variant>/edits.csv``: one
  row per edit (update norm and ratio, denominator, edit seconds); ``<variant>/ckpt/``: the
  checkpoint after the last edit, from which an interrupted run resumes;
* ``collapse.csv``, ``collapse.json``, ``collapse.md``: the table at edits k, 2k, ..., N of both
  variants (ES, generation exact match, perplexity, ‖ΔW‖ cumulative and of the last edit,
  smallest denominator), also printed; ``collapse.png``: one panel per figure, both variants
  against the edits applied;
* ``variants.csv``: one row per finished variant (its last curve row and its timings).

Every row and title names the editor, the strategy, the batch size, the evaluation timing, the
model and the data. Rerunning the same command resumes: a finished variant is skipped, an
interrupted one continues from its last checkpoint (no edit applied twice, no curve row lost or
repeated), and only the table and plot are redrawn. ``<variant>/run.json`` records the settings
of the run; a rerun with other settings in the same ``--out_dir`` is refused.

The YAML's defaults are sized for a 2-core CPU (both variants in well under an hour; see
docs/long-runs.md, "Collapse study"); a full-scale run on a GPU is a few thousand edits, e.g.
``--data.limit 3000 --curve.every 100 --model.values.steps null --model.templates.max_per_group
null --model.statistics.n_samples 10000 --curve.ppl_texts 100``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from lit_edit.data.request import EditRequest
from lit_edit.editors import ROME
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
    write_csv,
)
from lit_edit.plots import series_plot
from lit_edit.progress import Progress
from lit_edit.study import Study, data_label

log = logging.getLogger("lit_edit.recipes.rome_collapse")
DEFAULTS = __file__.removesuffix(".py") + ".yaml"

#: Variant name -> ``original_rome``.
VARIANTS = {"original": True, "r-rome": False}
META = ("editor", "strategy", "batch_size", "timing", "model", "data")
KEY = ("editor", "strategy", "batch_size", "variant", "model", "data")
#: Columns of the collapse table (those the curve has), after the run's names.
TABLE = ("prob/ES", "prob/PS", "gen_em/reliability", "prob/NS", "gen_em/locality_agreement", "ppl", "update_norm_total", "update_ratio_total",
         "edit/update_norm", "edit/denominator_min")
#: Per-edit diagnostics kept in ``edits.csv`` and drawn beside the curve (``per_edit/<name>``).
PER_EDIT = ("update_norm", "update_ratio", "denominator_min", "cond_max", "cond_D_max")


# ---------------------------------------------------------------------------- the study


def _arguments(parser) -> None:
    parser.add_argument("--variants", type=list[str], default=list(VARIANTS),
                        help=f"ROME variants to run: {', '.join(VARIANTS)} (original_rome true / false).")
    parser.add_class_arguments(RetentionCurve, "curve", skip=CURVE_SET)
    parser.set_defaults(out_dir="results/rome_collapse")


def _check(parser, cfg) -> None:
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or not cfg.variants:
        parser.error(f"--variants {cfg.variants}: choose one or more of {list(VARIANTS)}")
    if len(set(cfg.variants)) != len(cfg.variants):
        parser.error(f"--variants {cfg.variants} names a variant twice")
    if cfg.model.original_rome:
        parser.error("--model.original_rome is set by the study for each variant: use --variants")
    if not cfg.model.accumulate:
        parser.error("--model.accumulate must be true: the study keeps every edit (sequential ROME)")
    if cfg.data.batch_size != 1:
        parser.error(f"--data.batch_size must be 1 (sequential ROME edits one record at a time), got {cfg.data.batch_size}")
    if cfg.data.shuffle:
        parser.error("--data.shuffle must be false: both variants edit the records in the same order")
    check_curve(parser, cfg)


def collapse_rows(curves: dict[str, list[dict[str, Any]]], every: int) -> list[dict[str, Any]]:
    """The collapse table: per variant, the curve rows at k, 2k, ..., and the last (no baseline),
    with the run's names and the figures of :data:`TABLE` (``ppl`` = the perplexity column)."""
    out = []
    for variant, rows in curves.items():
        ppl = ppl_column(rows)
        edited = [r for r in rows if int(float(r["edits_applied"])) > 0]
        for i, r in enumerate(edited):
            n = int(float(r["edits_applied"]))
            if n % every and i != len(edited) - 1:
                continue
            row = {**{k: r.get(k, "") for k in META}, "variant": variant, "original_rome": VARIANTS[variant], "edits_applied": n}
            for column in TABLE:
                source = ppl if column == "ppl" else column
                if source is not None and r.get(source) not in (None, ""):
                    row[column] = float(r[source])
            out.append(row)
    return out


def main(args: Optional[list[str]] = None) -> list[dict[str, Any]]:
    study = Study.start(ROME, __doc__, DEFAULTS, args, table="variants.csv", key=KEY, add_arguments=_arguments, check=_check)
    cfg, table = study.cfg, study.table
    requests = study.datamodule.load()
    if not requests:
        study.parser.error("--data selects no record")
    curve_args = curve_args_of(cfg)
    common = {"editor": "ROME", "strategy": "sequential", "batch_size": 1, "timing": "retention", "model": study.model_name,
              "data": data_label(cfg.data, len(requests))}
    settings = settings_digest(cfg, skip=("out_dir", "trainer", "config", "__path__", "variants", "eval"))
    todo = [v for v in cfg.variants if not table.done(**common, variant=v)]
    log.info("ROME collapse study: %d variant(s) to run, %d already done", len(todo), len(cfg.variants) - len(todo))
    with Progress(len(todo), "ROME variants", logger=log) as progress:
        for variant in todo:
            _run_variant(study, variant, requests, curve_args, common, settings)
            progress.update(variant=variant)

    return summarize(study, common, cfg.variants, curve_args["every"])


def _run_variant(study: Study, variant: str, requests: list[EditRequest], curve_args: dict[str, Any], common: dict[str, Any],
                 settings: dict[str, Any]) -> None:
    """Run (or resume) one variant's sequential fit, undo it, and add its row to the table."""
    run_dir = study.out / variant
    claim_run_dir(run_dir, {**settings, "variant": variant, **common})
    editor = study.editor(ROME, original_rome=VARIANTS[variant], accumulate=True)
    before = snapshot(study.model)
    log.info("%s: sequential ROME over %d record(s), a curve row every %d edits", variant, len(requests), curve_args["every"])
    result = sequential_fit(study, editor, requests, 1, run_dir, curve_args, {**common, "variant": variant})
    editor.restore()
    check_restored(editor, before)
    last = result["curve"][-1] if result["curve"] else {}
    row = {**common, "variant": variant, "original_rome": VARIANTS[variant], "n_edits": len(requests), "every": curve_args["every"],
           **{k: v for k, v in last.items() if k not in META and k != "seconds"},
           "edit_seconds": result["edit_seconds"], "eval_seconds": sum(float(r["seconds"]) for r in result["curve"])}
    study.table.add(row)


def summarize(study: Study, common: dict[str, Any], variants: list[str], every: int) -> list[dict[str, Any]]:
    """Table (CSV, JSON, markdown, printed) and plot of the variants' curves in ``study.out``."""
    curves = {v: read_csv(study.out / v / "retention.csv") for v in variants}
    curves = {v: rows for v, rows in curves.items() if rows}
    rows = collapse_rows(curves, every)
    name = "collapse"
    title = (f"ROME collapse: {common['strategy']} edits (batch {common['batch_size']}) on {common['model']}, "
             f"{common['data']}, {common['timing']} evaluation every {every} edits")
    write_csv(study.out / f"{name}.csv", rows)
    document = {"title": title, **common, "every": every, "rows": rows}
    atomic_write(study.out / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1, default=str)))
    shown = [c for c in TABLE if any(c in r for r in rows)]
    study.finish(rows, ["variant", "edits_applied", *shown], title, name)
    if curves:
        plotted: list[dict[str, Any]] = [{**r, "variant": v} for v, rs in curves.items() for r in rs]
        for v in curves:  # every edit's own diagnostics, beside the curve's
            for r in read_csv(study.out / v / "edits.csv"):
                plotted.append({"variant": v, "edits_applied": r["edits_applied"],
                                **{f"per_edit/{d}": r[f"edit/{d}"] for d in PER_EDIT if r.get(f"edit/{d}") not in (None, "")}})
        ppl = ppl_column(plotted)
        metrics = [m for m in ("prob/ES", "prob/PS", "gen_em/reliability", "prob/NS", "gen_em/locality_agreement", ppl,
                               "update_norm_total", "per_edit/update_norm", "per_edit/denominator_min")
                   if m is not None and any(r.get(m) not in (None, "") for r in plotted)]
        series_plot(plotted, metrics, study.out / f"{name}.png", x_key="edits_applied", series_key="variant", title=title,
                    log_y=("per_edit/denominator_min", "per_edit/update_norm"))
    print(f"Wrote {study.out / (name + '.csv')}, {name}.json, {name}.md" + (f", {name}.png" if curves else ""))
    return rows


if __name__ == "__main__":
    main()
