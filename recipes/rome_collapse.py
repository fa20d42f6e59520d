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
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_edit.data.datamodule import EditDataModule
from lit_edit.data.request import EditRequest
from lit_edit.editors import ROME
from lit_edit.evaluation import RetentionCurve
from lit_edit.io import atomic_write
from lit_edit.plots import series_plot
from lit_edit.progress import Progress
from lit_edit.study import Study

log = logging.getLogger("lit_edit.recipes.rome_collapse")
DEFAULTS = __file__.removesuffix(".py") + ".yaml"

#: Variant name -> ``original_rome``.
VARIANTS = {"original": True, "r-rome": False}
META = ("editor", "strategy", "batch_size", "timing", "model", "data")
KEY = ("editor", "strategy", "batch_size", "variant", "model", "data")
#: RetentionCurve arguments the study sets itself.
CURVE_SET = {"path", "plot", "overwrite", "strategy", "data"}
#: Columns of the collapse table (those the curve has), after the run's names.
TABLE = ("prob/ES", "prob/PS", "gen_em/reliability", "prob/NS", "gen_em/locality_agreement", "ppl", "update_norm_total", "update_ratio_total",
         "edit/update_norm", "edit/denominator_min")
#: Per-edit diagnostics kept in ``edits.csv`` and drawn beside the curve (``per_edit/<name>``).
PER_EDIT = ("update_norm", "update_ratio", "denominator_min", "cond_max", "cond_D_max")


# ---------------------------------------------------------------------------- shared with batch_size_study


def data_label(data: Any, n: int) -> str:
    """The records a study edits, e.g. ``counterfact[1000:1100]`` (``demo`` for the built-in set)."""
    path = getattr(data, "path", None) or "demo"
    offset = int(getattr(data, "offset", 0) or 0)
    return f"{path}[{offset}:{offset + n}]"


def _key(r: EditRequest) -> str:
    return json.dumps(r.case_id if r.case_id is not None else [r.prompt, r.target_new])


class EditLog(L.Callback):
    """One row per committed edit batch (or LocFT-BF round): edits applied, requests, the seconds
    the edit took (from the start of its first data batch to the commit, so the curve's
    evaluations are left out) and the editor's diagnostics of that batch. Written to ``path``
    (CSV) after each row and kept in checkpoints, so a resumed fit continues it."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = Path(path), dict(meta)
        self.rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._mark: Optional[float] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark = None
        self._write(trainer)  # a resumed fit: rows written after the checkpoint are dropped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._mark is None:
            self._mark = time.perf_counter()

    def on_edits_committed(self, trainer, editor, requests: list[EditRequest]) -> None:
        new = [k for k in (_key(r) for r in requests) if k not in self._keys]
        if not new:
            return
        self._keys.update(new)
        now = time.perf_counter()
        seconds = now - (self._mark if self._mark is not None else now)
        self._mark = None  # the next edit is timed from its own first batch (after any curve evaluation)
        diagnostics = {f"edit/{k}": float(v) for k, v in (getattr(editor, "last_diagnostics", None) or {}).items()}
        self.rows.append({**self.meta, "edits_applied": len(self._keys), "requests": len(new), "edit_seconds": seconds, **diagnostics})
        self._write(trainer)

    @property
    def edit_seconds(self) -> float:
        return sum(float(r["edit_seconds"]) for r in self.rows)

    def _write(self, trainer) -> None:
        if trainer.is_global_zero:
            write_csv(self.path, self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "keys": sorted(self._keys)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self._keys = set(state_dict.get("keys", []))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV (columns in the order rows gained them), written atomically."""
    import csv

    columns = list(dict.fromkeys(c for r in rows for c in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows])

    atomic_write(path, write)


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def claim_run_dir(run_dir: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``run_dir/run.json``; refuse a directory that holds a run with other settings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=1, sort_keys=True, default=str)
    marker = run_dir / "run.json"
    if marker.exists():
        old = json.loads(marker.read_text())
        new = json.loads(text)
        if old != new:
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"{run_dir} holds a run with other settings ({', '.join(differ)} differ, see {marker}): "
                "rerun with the same settings to resume it, or choose another --out_dir"
            )
        return
    atomic_write(marker, lambda tmp: Path(tmp).write_text(text))


def settings_digest(cfg: Any, skip: tuple[str, ...] = ("out_dir", "trainer", "config", "__path__")) -> dict[str, Any]:
    """The parsed settings a run's results depend on (without the output directory and the
    trainer's display settings), as plain JSON values."""
    plain = json.loads(json.dumps(cfg.as_dict() if hasattr(cfg, "as_dict") else vars(cfg), default=str))
    return {k: v for k, v in plain.items() if k not in skip}


def sequential_fit(
    study: Study,
    editor: Any,
    requests: list[EditRequest],
    batch_size: int,
    run_dir: Path,
    curve_args: dict[str, Any],
    meta: dict[str, Any],
    max_epochs: int = 1,
    rounds: bool = False,
) -> dict[str, Any]:
    """Fit ``editor`` over ``requests`` with its edits kept (sequential / sequential-batched),
    with a :class:`RetentionCurve` and an :class:`EditLog` in ``run_dir`` and a checkpoint after
    every edit batch (``rounds``: after every epoch, LocFT-BF in rounds, whose data batches are
    mini-batches). A checkpoint left in ``run_dir/ckpt`` by an interrupted fit is resumed.

    Returns the curve's rows, the log's rows, ``edit_seconds`` (the edits alone, summed over
    the batches, across resumes) and ``wall_seconds`` (this call)."""
    ckpt_dir = run_dir / "ckpt"
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if last.exists() else None
    edits = EditLog(run_dir / "edits.csv", meta)
    curve = RetentionCurve(**curve_args, path=run_dir / "retention.csv", strategy=meta["strategy"], data=meta["data"],
                           overwrite=resume is None)
    every = {"every_n_epochs": 1} if rounds else {"every_n_train_steps": 1}
    # the editors update weights themselves (manual optimisation): the checkpoint holds the state after each edit, as intended
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, **every)
    trainer = L.Trainer(**{
        **type(editor).trainer_defaults, "accelerator": study.cfg.trainer.accelerator, "devices": 1, "logger": False,
        "enable_model_summary": False, "enable_progress_bar": study.cfg.trainer.enable_progress_bar, "max_epochs": max_epochs,
        "enable_checkpointing": True, "default_root_dir": str(run_dir), "callbacks": [edits, curve, checkpoint],
    })
    data = EditDataModule(requests=requests, batch_size=batch_size, shuffle=False)
    if resume:
        log.info("resuming %s from %s", run_dir.name, last)
    started = time.perf_counter()
    trainer.fit(editor, datamodule=data, ckpt_path=resume)
    return {"curve": list(curve.rows), "edits": list(edits.rows), "edit_seconds": edits.edit_seconds,
            "wall_seconds": time.perf_counter() - started, "resumed": resume is not None}


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def snapshot(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """A bit-level checksum of every parameter (the sum and the sum of squares of its bits read as
    integers), computed where the tensor lives: any changed bit changes it, and it costs no copy
    of the model (which a study of a large model could not afford)."""
    out = {}
    for name, p in model.named_parameters():
        bits = p.detach().contiguous().view(_INT_VIEW[p.element_size()]).reshape(-1).long()
        out[name] = (int(bits.sum()), int((bits * bits).sum()))
    return out


def check_restored(editor: Any, originals: dict[str, tuple[int, int]]) -> None:
    """Raise unless every parameter's checksum (:func:`snapshot`) is back to its unedited value."""
    now = snapshot(editor.model)
    changed = [n for n, c in originals.items() if now.get(n) != c]
    if changed:
        raise RuntimeError(f"{changed} differ from the unedited weights after restoring: the study cannot go on")


def ppl_column(rows: list[dict[str, Any]]) -> Optional[str]:
    """The perplexity column of curve rows (``ppl/<corpus>``), if any."""
    return next((c for r in rows for c in r if c.startswith("ppl/")), None)


def curve_args_of(cfg: Any) -> dict[str, Any]:
    args = cfg.curve.as_dict() if hasattr(cfg.curve, "as_dict") else dict(vars(cfg.curve))
    return {k: v for k, v in args.items() if k not in CURVE_SET}


def check_curve(parser: Any, cfg: Any) -> None:
    """Build the retention curve once, so a bad ``--curve.*`` value is refused before the model loads."""
    try:
        RetentionCurve(**curve_args_of(cfg), plot=False)
    except (ValueError, TypeError) as e:
        parser.error(f"--curve: {e}")


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
