"""Long sequential runs inside a study: one resumable fit per run, its edit log, its settings and
the bit-level check that the model is unedited again afterwards.

A long study (``recipes/rome_collapse.py``, ``recipes/batch_size_study.py``) fits one editor
after another over the same loaded model, every edit kept (strategies ``sequential`` and
``sequential_batched``), and follows each run with a :class:`~lit_edit.evaluation.RetentionCurve`.
Each run lives in a directory of its own:

* :func:`claim_run_dir` records the run's settings in ``run.json`` and refuses a directory that
  holds a run with other settings;
* :func:`sequential_fit` fits the editor with the curve (``retention.csv``), an :class:`EditLog`
  (``edits.csv``: one row per committed batch, with the seconds the edit took and the editor's
  diagnostics) and a checkpoint after every edit batch (``ckpt/last.ckpt``), from which a rerun
  resumes an interrupted fit: no edit applied twice, no curve or log row lost or repeated;
* :func:`snapshot` and :func:`check_restored` prove, by a checksum of every parameter's bits,
  that undoing the run put the model back exactly, so the next run starts from the unedited
  weights.

The curve's own options are parsed as ``--curve.*`` (:data:`CURVE_SET` are the ones the study
sets per run); :func:`curve_args_of` reads them back and :func:`check_curve` refuses a bad value
before the model loads. :func:`settings_digest`, :func:`write_csv`, :func:`read_csv` and
:func:`ppl_column` digest the settings and read or write the run's tables.

    claim_run_dir(run_dir, {**settings_digest(study.cfg), **meta})
    before = snapshot(study.model)
    editor = study.editor(MEMIT, accumulate=True)
    result = sequential_fit(study, editor, requests, 8, run_dir, curve_args_of(study.cfg), meta)
    editor.restore()
    check_restored(editor, before)
"""

from __future__ import annotations

import csv
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
from lit_edit.evaluation import RetentionCurve
from lit_edit.io import atomic_write
from lit_edit.study import Study

log = logging.getLogger(__name__)

__all__ = [
    "CURVE_SET",
    "EditLog",
    "check_curve",
    "check_restored",
    "claim_run_dir",
    "curve_args_of",
    "ppl_column",
    "read_csv",
    "sequential_fit",
    "settings_digest",
    "snapshot",
    "write_csv",
]

#: :class:`~lit_edit.evaluation.RetentionCurve` arguments a study sets itself for each run (not parsed as ``--curve.*``).
CURVE_SET = {"path", "plot", "overwrite", "strategy", "data"}


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
    """``rows`` as a CSV (columns in the order rows gained them, floats at full precision), written atomically."""
    columns = list(dict.fromkeys(c for r in rows for c in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows([{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows])

    atomic_write(path, write)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of the CSV at ``path`` (values as text); no rows when there is no file."""
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

    ``meta`` names the run (its ``strategy`` and ``data`` go to the curve; all of it heads every
    log row). Returns the curve's rows, the log's rows, ``edit_seconds`` (the edits alone, summed
    over the batches, across resumes), ``wall_seconds`` (this call) and ``resumed``."""
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
    """Raise unless every parameter's checksum (:func:`snapshot`) of ``editor.model`` is back to its unedited value."""
    now = snapshot(editor.model)
    changed = [n for n, c in originals.items() if now.get(n) != c]
    if changed:
        raise RuntimeError(f"{changed} differ from the unedited weights after restoring: the study cannot go on")


def ppl_column(rows: list[dict[str, Any]]) -> Optional[str]:
    """The perplexity column of curve rows (``ppl/<corpus>``), if any."""
    return next((c for r in rows for c in r if c.startswith("ppl/")), None)


def curve_args_of(cfg: Any) -> dict[str, Any]:
    """The parsed ``--curve.*`` settings, as :class:`RetentionCurve` arguments (without :data:`CURVE_SET`)."""
    args = cfg.curve.as_dict() if hasattr(cfg.curve, "as_dict") else dict(vars(cfg.curve))
    return {k: v for k, v in args.items() if k not in CURVE_SET}


def check_curve(parser: Any, cfg: Any) -> None:
    """Build the retention curve once, so a bad ``--curve.*`` value is refused before the model loads."""
    try:
        RetentionCurve(**curve_args_of(cfg), plot=False)
    except (ValueError, TypeError) as e:
        parser.error(f"--curve: {e}")
