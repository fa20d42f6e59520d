"""Study scaffolding: the skeleton every study recipe shares.

A study edits one loaded model many times and tabulates the figures of each run:

    parse → seed → load the model → resumable table → fit and score each run → markdown / CSV /
    plot → print

:class:`Study` holds the parsed settings, the model and tokenizer (loaded once with
:func:`~lit_edit.models.load_causal_lm`), the :class:`~lit_edit.evaluation.Evaluator`, the output
directory and a :class:`ResumableTable` whose rows are appended (atomically) as runs finish, so
an interrupted study resumes where it stopped: finished rows are skipped, never repeated. Every
run fits an editor built over the same model, is scored after all edits against the same
unedited reference, and is restored bit-exactly before the next run. The resolved settings are
written to ``config.yaml`` beside the table, so any table can be re-run
(``--config <out_dir>/config.yaml``).

    study = Study.start(LocFTBF, __doc__, "recipes/my_study.yaml", args, table="runs.csv", key=("method",),
                        add_arguments=lambda parser: parser.add_argument("--methods", ...))
    before = study.unedited(requests)
    for method in study.cfg.methods:
        if not study.table.done(method=method):
            editor = study.editor(LocFTBF, lr=...)
            study.table.add(study_row(study.fit_and_score(editor, requests, datamodule, before.reference), method=method))
    study.finish(study.table.rows, columns, "title")
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lit_edit.data.datamodule import EditDataModule
from lit_edit.data.request import EditRequest
from lit_edit.editors.base import Editor
from lit_edit.evaluation import Evaluation, Evaluator, UneditedCache
from lit_edit.evaluation.metrics import harmonic_mean
from lit_edit.io import atomic_write
from lit_edit.models import arch_for, load_causal_lm, model_identity

log = logging.getLogger(__name__)

__all__ = [
    "ResumableTable",
    "STUDY_FIGURES",
    "Study",
    "data_label",
    "edit_score",
    "protocol_label",
    "reference_row",
    "study_column",
    "study_row",
    "write_markdown",
]

#: The figures studies report: generation exact match when that protocol ran, else teacher-forced
#: token accuracy; plus perplexity.
STUDY_FIGURES = {
    "reliability": ("gen_em/reliability", "tok_acc/reliability"),
    "generalization": ("gen_em/generalization", "tok_acc/generalization"),
    "locality": ("gen_em/locality_agreement", "tok_acc/locality"),
    "perplexity": ("ppl/",),
}

#: Editor arguments that the study sets itself (the loaded model), not the parsed ``model`` group.
_MODEL_ARGS = ("model", "tokenizer", "dtype")


class ResumableTable:
    """A CSV of finished runs keyed by some columns; rows are appended (and written) one by one."""

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
        self.rows.append(dict(row))
        columns = list(dict.fromkeys(c for r in self.rows for c in r))

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)


class Study:
    """A parsed, seeded study over one loaded model (see the module docstring); build with :meth:`start`."""

    def __init__(self, parser: ArgumentParser, cfg: Namespace, editor_class: type, table: str, key: Sequence[str]):
        self.parser, self.cfg, self.editor_class = parser, cfg, editor_class
        L.seed_everything(cfg.seed_everything, verbose=False)
        built = parser.instantiate_classes(cfg) if not hasattr(parser, "instantiate") else parser.instantiate(cfg)
        self.datamodule: EditDataModule = built.data
        self.evaluator: Evaluator = built.eval
        editor_args = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(vars(cfg.model))
        self.model, self.tokenizer = load_causal_lm(editor_args["model"], editor_args.get("tokenizer"), editor_args.get("dtype", "float32"))
        self.arch = arch_for(self.model)
        self.model_name = model_identity(self.model)
        self.editor_args = {k: v for k, v in editor_args.items() if k not in _MODEL_ARGS}
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.table = ResumableTable(self.out / table, key=key)
        text = parser.dump(cfg, skip_none=False)
        atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def parser(cls, editor_class: type, description: Optional[str], default_config: Any = None) -> ArgumentParser:
        """The study parser: ``--model.*`` (editor arguments), ``--data.*``, ``--eval.*`` (the
        :class:`~lit_edit.evaluation.Evaluator`), ``--trainer.*`` (the scalar Trainer settings a study
        varies), ``--seed_everything`` and ``--out_dir``; ``--config`` reads a YAML of any of them."""
        defaults = [str(default_config)] if default_config is not None and Path(default_config).exists() else []
        parser = ArgumentParser(description=description, default_config_files=defaults)
        parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the settings below.")
        parser.add_class_arguments(editor_class, "model", instantiate=False)
        parser.add_class_arguments(EditDataModule, "data")
        parser.add_class_arguments(Evaluator, "eval")
        trainer_defaults = getattr(editor_class, "trainer_defaults", {})
        parser.add_argument("--trainer.max_epochs", type=int, default=trainer_defaults.get("max_epochs", 25), help="Epochs per run.")
        parser.add_argument("--trainer.accelerator", type=str, default="auto", help="cpu, gpu, auto, ...")
        parser.add_argument("--trainer.enable_progress_bar", type=bool, default=True, help="Show per-run progress bars.")
        parser.add_argument("--seed_everything", type=int, default=0, help="Global seed.")
        parser.add_argument("--out_dir", type=str, default="results/study", help="Where the table, plots and config go.")
        return parser

    @classmethod
    def start(
        cls,
        editor_class: type,
        description: Optional[str],
        default_config: Any,
        args: Optional[list[str]],
        table: str,
        key: Sequence[str],
        add_arguments: Optional[Callable[[ArgumentParser], None]] = None,
        check: Optional[Callable[[ArgumentParser, Namespace], None]] = None,
    ) -> Study:
        """Parse ``args`` (YAML defaults + overrides), check them, seed, load the model, open the table.

        ``add_arguments(parser)`` adds the study's own options; ``check(parser, cfg)`` rejects bad
        values with ``parser.error`` before anything is loaded.
        """
        from lit_edit.cli import configure_output

        configure_output()
        parser = cls.parser(editor_class, description, default_config)
        if add_arguments is not None:
            add_arguments(parser)
        cfg = parser.parse_args(args)
        if check is not None:
            check(parser, cfg)
        return cls(parser, cfg, editor_class, table, key)

    # ------------------------------------------------------------------ runs

    @property
    def num_layers(self) -> int:
        return len(self.model.get_submodule(self.arch.layers))

    def editor(self, editor_class: Optional[type] = None, **overrides: Any) -> Editor:
        """An editor over the loaded model with the parsed ``model`` arguments (those ``editor_class``
        takes: a study parsing LocFT-BF's arguments may build a DepthFirstFT) and ``overrides``."""
        cls = editor_class or self.editor_class
        args = {k: v for k, v in self.editor_args.items() if k in _init_arguments(cls)}
        return cls(model=self.model, tokenizer=self.tokenizer, **{**args, **overrides})

    def trainer_kwargs(self, **overrides: Any) -> dict[str, Any]:
        return {**vars(self.cfg.trainer), **overrides}

    def unedited(self, requests: list[EditRequest]) -> Evaluation:
        """The unedited model's evaluation on ``requests`` (figures and reference).

        Kept in ``unedited/`` beside the table by :class:`~lit_edit.evaluation.UneditedCache`
        (keyed by the model's weights, the requests and the evaluation settings), so rerunning a
        study, to resume or only to redraw its table, evaluates the unedited model once.
        """
        return UneditedCache.evaluate(UneditedCache(self.out / "unedited"), self.evaluator, self.model, self.tokenizer, requests)

    def fit_and_score(
        self,
        editor: Editor,
        requests: list[EditRequest],
        datamodule: L.LightningDataModule,
        reference: Any,
        **trainer_overrides: Any,
    ) -> dict[str, float]:
        """Fit ``editor``, evaluate after all edits against ``reference``, restore; return the figures
        plus ``edit_seconds``, ``epochs_run`` and ``optimizer_steps``."""
        trainer = L.Trainer(
            **{
                "accelerator": "auto",
                "devices": 1,
                "logger": False,
                "enable_checkpointing": False,
                "enable_model_summary": False,
                **self.trainer_kwargs(**trainer_overrides),
            }
        )
        started = time.perf_counter()
        trainer.fit(editor, datamodule=datamodule)
        seconds = time.perf_counter() - started
        figures = self.evaluator.evaluate(editor.model, editor.tokenizer, requests, reference=reference).figures
        figures["edit_seconds"] = seconds
        figures["epochs_run"] = float(trainer.current_epoch)
        figures["optimizer_steps"] = float(getattr(editor, "optimizer_steps", math.nan))
        editor.restore()
        return figures

    # ------------------------------------------------------------------ output

    def finish(self, rows: list[dict[str, Any]], columns: Sequence[str], title: str, name: str) -> str:
        """Write ``<name>.md`` (and keep the CSV), print the table; returns its text."""
        text = write_markdown(rows, columns, self.out / f"{name}.md", title)
        print(text)
        return text


def _init_arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes, along the ``**kwargs`` chain of its ``__init__`` methods."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def data_label(data: Any, n: int) -> str:
    """The ``n`` records a study edits from the parsed ``--data.*`` settings, e.g.
    ``counterfact[1000:1100]`` (``demo`` for the built-in set): the ``data`` name its rows carry."""
    path = getattr(data, "path", None) or "demo"
    offset = int(getattr(data, "offset", 0) or 0)
    return f"{path}[{offset}:{offset + n}]"


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
    if ppl > ppl_before * (1 + ppl_tolerance):
        return 0.0
    return harmonic_mean(scores)


def _number(value: Any) -> float:
    """``value`` as a float; ``nan`` for a missing or empty cell (a column older runs lack)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        return str(int(value))  # a count or a key (block 0), not a measured figure
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "nan"
    return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"


def protocol_label(evaluator: Evaluator) -> str:
    """How the study figures were measured, for table titles."""
    return "generation exact match" if "generation" in evaluator.protocols else "teacher-forced token accuracy"


def write_markdown(rows: list[dict[str, Any]], columns: Sequence[str], path: Path, title: str = "") -> str:
    """A markdown table of ``rows`` written to ``path`` (also returned as text)."""
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return text


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
    """The four study figures of the unedited model."""
    return {short: figures.get(_figure_name(figures, short), math.nan) for short in STUDY_FIGURES}
