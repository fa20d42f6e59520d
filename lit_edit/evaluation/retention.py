"""``RetentionCurve``: figures of a long (sequential) editing run as the edits accumulate.

Every ``every`` committed edits (an editor announces each batch or round it keeps through
:meth:`~lit_edit.editors.base.Editor.commit_edits`), the callback scores the model as it is at
that moment and appends one row:

* **all edits applied so far** (reliability, generalization: ``prob/ES``, ``tok_acc/reliability``,
  ...), scored without their locality prompts; with ``applied_limit``, a fixed uniform sample of
  at most that many of them (``edits_scored`` says how many a row scored);
* optionally **the first chunk** (the first ``every`` edits) again, as ``first/<figure>``: what
  the run forgets;
* a **fixed locality set** (``prob/NS``, ``tok_acc/locality``, ``gen_em/locality_agreement``, ...;
  compared with the unedited model's outputs, recorded before the first edit) and a **fixed
  perplexity set** (``ppl/<corpus>``), the same for every row, so rows are comparable;
* ``prob/S``: the harmonic mean of the row's ``prob/ES``, ``prob/PS`` and ``prob/NS``;
* the cumulative update ``‖W − W₀‖`` over every tensor the editor touched (and relative to
  ``‖W₀‖``), and the diagnostics of the last edit batch (``edit/<name>``: update norm, the
  condition numbers and denominators of the closed-form solves).

Rows go to a CSV (rewritten whole, atomically, on every row), a PNG plot of each figure against
the edits applied, and the trainer's loggers (``retention/<column>``). The curve is part of the
callback's checkpoint state: a fit resumed with ``trainer.fit(..., ckpt_path=...)`` continues it,
and the CSV is rewritten from the checkpoint's rows first, so no row is lost or repeated.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import heapq
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lit_edit.data.request import EditRequest
from lit_edit.distributed import gather_objects
from lit_edit.evaluation.callback import module_model_and_tokenizer
from lit_edit.evaluation.evaluator import EvaluationReference, Evaluator, as_requests
from lit_edit.evaluation.metrics import harmonic_mean
from lit_edit.evaluation.report import model_label
from lit_edit.io import atomic_write
from lit_edit.options import check_bool, check_int, check_str

log = logging.getLogger(__name__)

__all__ = [
    "LOCALITY_FIGURES",
    "META_COLUMNS",
    "RETENTION_TIMING",
    "RetentionCurve",
    "edit_view",
    "locality_view",
    "scored_sample",
]

RETENTION_TIMING = "retention"
"""The evaluation timing every row names: the model scored part-way through a sequential run."""

META_COLUMNS = ("editor", "strategy", "batch_size", "timing", "model", "data")
"""The columns that name the run, first in every row."""

LEADING_COLUMNS = (*META_COLUMNS, "edits_applied", "seconds", "update_norm_total", "update_ratio_total")

LOCALITY_FIGURES = ("prob/NS", "prob/NM", "tok_acc/locality", "gen_em/locality", "gen_em/locality_agreement")
"""Figures taken from the fixed locality set (never from the edited requests)."""

EDIT_PROTOCOLS = ("probability", "token_accuracy", "generation", "fluency")
"""Protocols scored on the edits applied so far (and the first chunk)."""

LOCALITY_PROTOCOLS = ("probability", "token_accuracy", "generation")
"""Protocols scored on the fixed locality set."""

MODEL_PROTOCOLS = ("perplexity", "harness")
"""Protocols of the model alone (fixed texts or tasks)."""

PLOTTED_DIAGNOSTICS = ("update_norm", "update_ratio", "residual", "cond_max", "cond_D_max", "denominator_min")
"""Diagnostics of the last edit batch drawn in the plot (when the editor reports them)."""

_FORMAT = "lit_edit.retention/1"


def edit_view(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The requests as a row scores the edits: without their locality prompts (locality comes
    from the fixed locality set)."""
    return [dataclasses.replace(r, locality=()) for r in requests]


def locality_view(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The requests as the fixed locality set: those with locality prompts, without paraphrases
    or portability prompts (only their locality figures are kept)."""
    return [dataclasses.replace(r, paraphrase_prompts=(), portability=()) for r in requests if r.locality]


def _key(r: EditRequest) -> Any:
    return r.case_id if r.case_id is not None else (r.prompt, r.target_new)


def _priority(r: EditRequest) -> int:
    """A request's place in the scored sample (lower first): a hash of its identity alone."""
    ident = json.dumps(["case_id", r.case_id] if r.case_id is not None else [r.prompt, r.subject, r.target_new], default=str)
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:8], "big")


def scored_sample(applied: Sequence[EditRequest], limit: Optional[int]) -> list[EditRequest]:
    """The edits a row scores: all of ``applied``, or the ``limit`` of lowest :func:`_priority`
    (a uniform sample fixed by the requests), in the order they were applied."""
    if limit is None or len(applied) <= limit:
        return list(applied)
    keep = sorted(heapq.nsmallest(limit, range(len(applied)), key=lambda i: (_priority(applied[i]), i)))
    return [applied[i] for i in keep]


class RetentionCurve(L.Callback):
    """Score a sequential editing run every ``every`` committed edits; write a CSV and a plot.

    Args:
        every: a row each time the number of edits applied reaches a multiple of ``every``
            (or passes one, when batches do not divide it), and a last row at the end of training
            when the last edits fall between two multiples.
        protocols: any of ``probability``, ``token_accuracy``, ``generation``, ``perplexity``,
            ``fluency`` and ``harness`` (default: the cheap teacher-forced ones and perplexity).
        first_chunk: also score the first ``every`` edits in each row (``first/<figure>``).
        applied_limit: score at most this many of the edits applied so far in each row (``None``:
            all of them). The sample is uniform and fixed by the requests alone: each edit gets a
            hash-derived priority and a row scores the ``applied_limit`` applied edits of lowest
            priority, so an edit stays in the sample until newer edits of lower priority push it
            out, a resumed run scores the same sample, and a long run's rows cost a bounded
            evaluation each instead of one that grows with every edit.
        locality: the fixed locality set: requests whose locality prompts every row scores (a
            list of :class:`EditRequest`, or a file or data set name readable by
            :func:`lit_edit.data.load_requests`); default: the run's own requests
            (``trainer.datamodule.eval_requests``). Requests without locality prompts are left out.
        locality_limit: use at most this many requests of the locality set (``None``: all).
        batch_size: prompts per forward / generation batch.
        max_new_tokens: generation budget of the exact-match protocol.
        ppl_corpus: perplexity text (as :class:`~lit_edit.evaluation.Evaluator`): ``wiki``, a
            file, a list of strings, or a hub dataset name.
        ppl_texts: number of perplexity texts (the fixed perplexity set).
        ppl_max_length: tokens per perplexity text.
        path: the CSV (default ``retention.csv`` in the trainer's log directory, else the working
            directory); the plot goes beside it with the suffix ``.png``.
        plot: write the plot (needs matplotlib, the ``plot`` extra).
        baseline: start the curve with a row at 0 edits (the unedited model's locality and
            perplexity figures).
        overwrite: replace a retention CSV and plot a previous run left at ``path``. A file at
            ``path`` that is not a retention CSV is never replaced. A resumed fit always rewrites
            its own curve.
        strategy: the strategy the rows name; default: the editor's ``strategy`` hyperparameter
            when it has one, else derived from the batch size and ``accumulate``
            (``sequential`` for batches of 1, ``sequential-batched`` otherwise).
        data: the data the rows name; default: the data module's source (path, offset, limit).
    """

    def __init__(
        self,
        every: int = 100,
        protocols: Sequence[str] = ("probability", "token_accuracy", "perplexity"),
        first_chunk: bool = False,
        applied_limit: Optional[int] = None,
        locality: Union[str, Sequence[EditRequest], None] = None,
        locality_limit: Optional[int] = 100,
        batch_size: int = 32,
        max_new_tokens: int = 32,
        ppl_corpus: Union[str, Sequence[str]] = "wiki",
        ppl_texts: int = 20,
        ppl_max_length: int = 128,
        path: Optional[Union[str, os.PathLike]] = None,
        plot: bool = True,
        baseline: bool = True,
        overwrite: bool = False,
        strategy: Optional[str] = None,
        data: Optional[str] = None,
    ):
        self.every = check_int("every", every, minimum=1)
        self.first_chunk = check_bool("first_chunk", first_chunk)
        self.applied_limit = check_int("applied_limit", applied_limit, minimum=1, allow_none=True)
        self.locality_limit = check_int("locality_limit", locality_limit, minimum=1, allow_none=True)
        self.plot = check_bool("plot", plot)
        self.baseline = check_bool("baseline", baseline)
        self.overwrite = check_bool("overwrite", overwrite)
        self.strategy = check_str("strategy", strategy, allow_none=True)
        self.data = check_str("data", data, allow_none=True)
        check_int("batch_size", batch_size, minimum=1)
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        check_int("ppl_texts", ppl_texts, minimum=1)
        check_int("ppl_max_length", ppl_max_length, minimum=2)
        self.evaluator = Evaluator(protocols, batch_size, max_new_tokens, ppl_corpus, ppl_texts, ppl_max_length)
        if path is not None:
            if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
                raise ValueError(f"path must be a file name, got {path!r}")
            if Path(path).is_dir():
                raise ValueError(f"path {str(path)!r} is a directory; name the CSV file to write (e.g. {str(Path(path) / 'retention.csv')!r})")
        self.path = None if path is None else Path(path)
        if self.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ImportError("plot=True needs matplotlib: pip install 'lit-edit[plot]', or pass plot=False") from None
        self._locality_source = None if locality is None else as_requests(locality)  # a bad file fails here
        #: The rows of the curve so far (one dict per row, the CSV's columns).
        self.rows: list[dict[str, Any]] = []
        #: Every edit applied so far, in order.
        self.applied: list[EditRequest] = []
        self.reference: Optional[EvaluationReference] = None
        self.csv_path: Optional[Path] = None
        self.png_path: Optional[Path] = None
        self._keys: set = set()
        self._next_at = self.every
        self._meta: dict[str, Any] = {}
        self._locality: list[EditRequest] = []
        self._last_diagnostics: dict[str, float] = {}
        self._stored: Optional[dict[str, Any]] = None
        self._pending: list[EditRequest] = []
        self._active = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every, path=None if self.path is None else str(self.path))

    # ------------------------------------------------------------------ settings

    def _settings(self) -> dict[str, Any]:
        """What a resumed fit must share with the checkpoint's curve."""
        digest = hashlib.sha256(json.dumps([r.to_dict() for r in self._locality], sort_keys=True, default=str).encode()).hexdigest()
        return {
            "every": self.every,
            "first_chunk": self.first_chunk,
            "applied_limit": self.applied_limit,
            "baseline": self.baseline,
            "protocols": self.evaluator.descriptions(),
            "locality": {"requests": len(self._locality), "sha256": digest},
        }

    def _resolve_locality(self, trainer: L.Trainer) -> list[EditRequest]:
        source: Any = self._locality_source
        if source is None:
            source = getattr(getattr(trainer, "datamodule", None), "eval_requests", None)
            source = as_requests(source() if callable(source) else source)
        chosen = locality_view(source)
        if self.locality_limit is not None:
            chosen = chosen[: self.locality_limit]
        wants = [p for p in self.evaluator.protocols if p in LOCALITY_PROTOCOLS]
        if wants and not chosen:
            log.warning("the retention curve has no locality set (no request with locality prompts): rows carry no locality figures")
        return chosen

    def _describe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The run every row names: editor, strategy, batch size, timing, model and data."""
        hp = dict(getattr(pl_module, "hparams", {}) or {})
        dm = getattr(trainer, "datamodule", None)
        batch_size: Optional[int] = None
        dm_hp = dict(getattr(dm, "hparams", {}) or {})
        if isinstance(dm_hp.get("batch_size"), int):
            batch_size = dm_hp["batch_size"] or len(getattr(dm, "requests", None) or []) or None
        if batch_size is None:
            loader = getattr(trainer, "train_dataloader", None)
            batch_size = getattr(loader, "batch_size", None)
        record = getattr(pl_module, "run_record", None)
        recorded = record.get("strategy") if isinstance(record, dict) else None
        strategy = self.strategy
        if isinstance(recorded, dict) and recorded.get("name"):  # the editor's record of its strategy
            strategy = strategy or str(recorded["name"])
            batch_size = recorded.get("batch_size", batch_size)
        if strategy is None and isinstance(hp.get("strategy"), str):
            strategy = hp["strategy"]
        if strategy is None:
            accumulate = hp.get("accumulate", True)
            if batch_size == 1:
                strategy = "sequential" if accumulate else "single"
            else:
                strategy = "sequential_batched" if accumulate else "batched"
        data = self.data
        if data is None:
            if dm is None:
                data = "train dataloader"
            elif getattr(dm, "_given", None) is not None:
                data = f"{len(dm._given)} given requests"
            else:
                data = str(dm_hp.get("path") or "demo")
                parts = [f"{k} {dm_hp[k]}" for k in ("offset", "limit") if dm_hp.get(k)]
                data += f" ({', '.join(parts)})" if parts else ""
        return {
            "editor": type(pl_module).__name__,
            "strategy": strategy,
            "batch_size": batch_size if batch_size is not None else "",
            "timing": RETENTION_TIMING,
            "model": model_label(pl_module) or "",
            "data": data,
        }

    def _paths(self, trainer: L.Trainer) -> tuple[Path, Path]:
        csv_path = self.path if self.path is not None else Path(trainer.log_dir or os.getcwd()) / "retention.csv"
        return csv_path, csv_path.with_suffix(".png")

    @staticmethod
    def _is_curve(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError):
            return False
        return tuple(header[: len(LEADING_COLUMNS)]) == LEADING_COLUMNS

    def _check_files(self, resuming: bool) -> None:
        """Refuse, before any work, to replace a file this callback did not write."""
        assert self.csv_path is not None and self.png_path is not None
        if self.csv_path.is_dir():
            raise ValueError(f"path {str(self.csv_path)!r} is a directory; name the CSV file to write")
        if self.csv_path.exists() and not self._is_curve(self.csv_path):
            raise FileExistsError(
                f"{self.csv_path} exists and is not a retention curve: RetentionCurve never replaces it; choose another path"
            )
        if resuming:
            return
        for existing in (p for p in (self.csv_path, self.png_path if self.plot else None) if p is not None and p.exists()):
            if existing == self.png_path and not self.csv_path.exists():
                raise FileExistsError(f"{existing} exists and was not written with a retention curve beside it; choose another path")
            if not self.overwrite:
                raise FileExistsError(
                    f"{existing} holds the retention curve of an earlier run; pass overwrite=True to replace it, or choose another path"
                )

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a checkpoint's state is restored, before the editor's own start-up and any edit
        self.csv_path, self.png_path = self._paths(trainer)
        if trainer.is_global_zero:
            self._check_files(resuming=self._stored is not None or trainer.ckpt_path is not None)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, tokenizer = self._model_and_tokenizer(pl_module)
        self._locality = self._resolve_locality(trainer)
        self._meta = self._describe(trainer, pl_module)
        self._active = True
        if self._stored is not None:  # resumed: the curve so far comes from the checkpoint
            stored, self._stored = self._stored, None
            settings = self._settings()
            for name in settings:
                if stored["settings"].get(name) != settings[name]:
                    raise ValueError(
                        f"the checkpoint's retention curve was made with {name}={stored['settings'].get(name)!r}, this fit has "
                        f"{settings[name]!r}: resume with the same RetentionCurve settings and data"
                    )
            for name in ("editor", "model"):
                if stored["meta"].get(name) != self._meta[name]:
                    raise ValueError(
                        f"the checkpoint's retention curve is of {name} {stored['meta'].get(name)!r}, this fit's is {self._meta[name]!r}"
                    )
            log.info("resuming the retention curve at %d edits applied (%d rows from the checkpoint)", len(self.applied), len(self.rows))
            self._write(trainer)  # rows written after the checkpoint, before the run stopped, are dropped
            self._reconcile(trainer, pl_module)
            return
        if trainer.ckpt_path is not None:
            raise ValueError(
                f"the fit resumes from {trainer.ckpt_path}, which holds no retention curve for this callback "
                f"({self.state_key}): its edits are already in the weights, so a new curve would start from an edited model. "
                "Resume with the RetentionCurve settings (every, path) the checkpoint was made with"
            )
        self.rows, self.applied, self._keys, self._next_at, self._pending = [], [], set(), self.every, []
        wants = [p for p in self.evaluator.protocols if p in LOCALITY_PROTOCOLS]
        if wants and self._locality:
            with _evaluating(model):
                result = self.evaluator.with_protocols(wants).evaluate(model, tokenizer, self._locality, **_share(trainer))
            self.reference = result.reference
            if trainer.world_size > 1:  # every process keeps the whole reference
                self.reference = result.reference.merged(gather_objects(result.reference))
        if self.baseline:
            self._add_row(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # The batch being edited, kept in checkpoints: a checkpoint saved at the end of a batch by
        # ModelCheckpoint comes before an editor that announces the batch in its own batch-end
        # hook does so (the built-in editors announce at the end of training_step; see _reconcile).
        self._pending = list(batch) if isinstance(batch, list) and all(isinstance(r, EditRequest) for r in batch) else []

    def _reconcile(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume: the requests of the batch the checkpoint was saved in that the editor
        records as applied (its checkpointed ``_done``) but this curve never counted, because
        the checkpoint was written before the editor announced them, are counted now."""
        done = getattr(pl_module, "_done", None)
        hp = dict(getattr(pl_module, "hparams", {}) or {})
        if not isinstance(done, set) or not hp.get("accumulate", True):
            return
        missing = [r for r in self._pending if _key(r) in done and _key(r) not in self._keys]
        if missing:
            log.info("counting %d edit(s) the checkpoint holds but saved before they were announced", len(missing))
            self.on_edits_committed(trainer, pl_module, missing)

    def on_edits_committed(self, trainer: L.Trainer, editor: L.LightningModule, requests: list[EditRequest]) -> None:
        """Called by the editor when the edits of ``requests`` are kept for good (see
        :meth:`~lit_edit.editors.base.Editor.commit_edits`): count them, and add a row when the
        number applied reaches the next multiple of ``every``."""
        if not self._active:
            return
        new = [r for r in requests if _key(r) not in self._keys]
        self.applied.extend(new)
        self._keys.update(_key(r) for r in new)
        self._last_diagnostics = {k: float(v) for k, v in (getattr(editor, "last_diagnostics", None) or {}).items()}
        if new and len(self.applied) >= self._next_at:
            self._add_row(trainer, editor)
            self._next_at = (len(self.applied) // self.every + 1) * self.every

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        if not self.applied:
            log.warning(
                "no edit was committed during the fit (accumulate=False, or an editor that does not announce its edits): "
                "the retention curve has no row after the baseline"
            )
            return
        if not self.rows or self.rows[-1]["edits_applied"] != len(self.applied):
            self._add_row(trainer, pl_module)

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _model_and_tokenizer(pl_module: L.LightningModule) -> tuple[nn.Module, Any]:
        return module_model_and_tokenizer(pl_module, "RetentionCurve")

    def figures(self, model: nn.Module, tokenizer: Any, applied: Sequence[EditRequest], rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """The figures of one row for ``model`` after the edits ``applied``: the edits
        (:func:`edit_view`; the :func:`scored_sample` of ``applied_limit`` of them), the first
        chunk, the fixed locality set against :attr:`reference`, the perplexity set, and ``prob/S``."""
        share = {"rank": rank, "world_size": world_size}
        out: dict[str, float] = {}
        edit_protocols = [p for p in self.evaluator.protocols if p in EDIT_PROTOCOLS]
        if edit_protocols and applied:
            scorer = self.evaluator.with_protocols(edit_protocols)
            sample = scored_sample(applied, self.applied_limit)
            out["edits_scored"] = len(sample)
            edits = scorer.evaluate(model, tokenizer, edit_view(sample), **share).figures
            out.update({k: v for k, v in edits.items() if k not in LOCALITY_FIGURES and k != "prob/S"})
            if self.first_chunk:
                chunk = list(applied[: self.every])
                first = edits if chunk == sample else scorer.evaluate(model, tokenizer, edit_view(chunk), **share).figures
                out.update({f"first/{k}": v for k, v in first.items() if k not in LOCALITY_FIGURES and k != "prob/S"})
        rest = [p for p in self.evaluator.protocols if p in MODEL_PROTOCOLS or (p in LOCALITY_PROTOCOLS and self._locality)]
        if rest:
            locality = self._locality if any(p in LOCALITY_PROTOCOLS for p in rest) else []
            reference = self.reference if locality else None
            found = self.evaluator.with_protocols(rest).evaluate(model, tokenizer, locality, reference, **share).figures
            out.update({k: v for k, v in found.items() if k in LOCALITY_FIGURES or k.split("/", 1)[0] in ("ppl", "harness")})
        for prefix in ("", "first/"):
            parts = [out.get(f"{prefix}prob/ES"), out.get(f"{prefix}prob/PS"), out.get("prob/NS")]
            if all(v is not None for v in parts):
                out[f"{prefix}prob/S"] = harmonic_mean(parts)
        return out

    @staticmethod
    @torch.no_grad()
    def update_norms(pl_module: Any) -> tuple[Optional[float], Optional[float]]:
        """``‖W − W₀‖`` over every tensor the editor touched (Frobenius, all together) and its
        ratio to ``‖W₀‖``; ``(None, None)`` for a module that keeps no originals."""
        originals = getattr(pl_module, "_originals", None)
        if originals is None or not hasattr(pl_module, "edited_tensors"):
            return None, None
        change = base = 0.0
        for name, now in pl_module.edited_tensors().items():
            w0 = originals[name].to(device=now.device, dtype=torch.float64)
            change += float((now.to(torch.float64) - w0).pow(2).sum())
            base += float(w0.pow(2).sum())
        return math.sqrt(change), (math.sqrt(change / base) if base > 0 else 0.0 if change == 0 else None)

    def _add_row(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, tokenizer = self._model_and_tokenizer(pl_module)
        started = time.perf_counter()
        share = _share(trainer)
        with _evaluating(model):
            figures = self.figures(model, tokenizer, self.applied, share["rank"], share["world_size"])
        norm, ratio = self.update_norms(pl_module)
        row: dict[str, Any] = {
            **self._meta,
            "edits_applied": len(self.applied),
            "seconds": time.perf_counter() - started,
            "update_norm_total": norm if norm is not None else "",
            "update_ratio_total": ratio if ratio is not None else "",
            **figures,
        }
        if self.applied:
            row.update({f"edit/{k}": v for k, v in self._last_diagnostics.items()})
        self.rows.append(row)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if k in ("prob/ES", "tok_acc/reliability", "prob/NS") or k.startswith("ppl/"))
        log.info("retention: %d edits applied: %s (%.1f s)", len(self.applied), shown or "no figure", row["seconds"])
        for logger in trainer.loggers:
            numbers = {f"retention/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            logger.log_metrics(numbers, step=trainer.global_step)
        self._write(trainer)

    # ------------------------------------------------------------------ files

    def columns(self) -> list[str]:
        """The CSV's columns: the leading ones, then every other column in the order rows gained them."""
        out = list(LEADING_COLUMNS)
        for row in self.rows:
            out += [k for k in row if k not in out]
        return out

    def csv_text(self) -> str:
        """The CSV of :attr:`rows` (floats written exactly, ``repr``)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        columns = self.columns()
        writer.writerow(columns)
        for row in self.rows:
            writer.writerow([_cell(row.get(c, "")) for c in columns])
        return buffer.getvalue()

    def panels(self) -> dict[str, list[str]]:
        """What the plot draws, panel by panel: the success and locality rates of each protocol
        (the first chunk's dashed), each perplexity, the cumulative update norm and the main
        diagnostics of the last batch."""
        columns = self.columns()
        out: dict[str, list[str]] = {}
        rates = {"prob": ("ES", "PS", "NS", "S"), "tok_acc": ("reliability", "generalization", "portability", "locality"),
                 "gen_em": ("reliability", "generalization", "portability", "locality", "locality_agreement")}
        for protocol, names in rates.items():
            lines = [c for n in names for c in (f"{protocol}/{n}", f"first/{protocol}/{n}") if c in columns]
            if lines:
                out[protocol] = lines
        for c in columns:
            if c.startswith(("ppl/", "fluency/", "harness/")):
                out[c] = [c]
        out["update_norm_total"] = ["update_norm_total"]
        out.update({f"edit/{d}": [f"edit/{d}"] for d in PLOTTED_DIAGNOSTICS if f"edit/{d}" in columns})
        return out

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or self.csv_path is None:
            return
        text = self.csv_text()
        atomic_write(self.csv_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if self.plot and self.rows:
            from lit_edit.plots import curve_plot

            meta = self._meta
            title = f"{meta.get('editor')} {meta.get('strategy')} (batch {meta.get('batch_size')}) on {meta.get('model')}: {meta.get('data')}"
            panels = self.panels()
            log_scale = [m for m in panels if m.startswith(("edit/cond", "edit/denominator"))]
            atomic_write(self.png_path, lambda tmp: curve_plot(self.rows, panels, Path(tmp), title=title, log_scale=log_scale))

    # ------------------------------------------------------------------ checkpoint state

    @override
    def state_dict(self) -> dict[str, Any]:
        """The curve so far: rows, the edits applied, the locality reference and the settings."""
        return {
            "format": _FORMAT,
            "rows": [dict(r) for r in self.rows],
            "applied": [r.to_dict() for r in self.applied],
            "next_at": self._next_at,
            "reference": None if self.reference is None else self.reference.state_dict(),
            "settings": self._settings() if self._active else None,
            "meta": dict(self._meta),
            "last_diagnostics": dict(self._last_diagnostics),
            "pending": [r.to_dict() for r in self._pending],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _FORMAT:
            raise ValueError(f"the checkpoint's retention state has format {state_dict.get('format')!r}, expected {_FORMAT!r}")
        if state_dict.get("settings") is None:
            return  # saved before the curve started
        self.rows = [dict(r) for r in state_dict["rows"]]
        self.applied = [EditRequest.from_dict(d) for d in state_dict["applied"]]
        self._keys = {_key(r) for r in self.applied}
        self._next_at = int(state_dict["next_at"])
        ref = state_dict.get("reference")
        self.reference = None if ref is None else EvaluationReference.from_state_dict(ref)
        self._last_diagnostics = dict(state_dict.get("last_diagnostics") or {})
        self._pending = [EditRequest.from_dict(d) for d in state_dict.get("pending") or []]
        self._stored = {"settings": state_dict["settings"], "meta": dict(state_dict.get("meta") or {})}


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    return value


def _share(trainer: L.Trainer) -> dict[str, int]:
    return {"rank": trainer.global_rank, "world_size": trainer.world_size}


@contextmanager
def _evaluating(model: nn.Module):
    """The model in eval mode, without gradients; every module's mode is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
