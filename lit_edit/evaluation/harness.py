"""Capability benchmarks through lm-evaluation-harness: the ``harness`` evaluation protocol.

The protocol runs chosen lm-evaluation-harness (``lm_eval``) tasks on the in-memory model, so the
evaluation engine scores them on the unedited model before the edits and on the edited model
after, like every other protocol: each task's metrics become figures named
``harness/<task>/<metric>`` (``harness/arc_easy/acc``, ``harness/hellaswag/acc_norm``; a metric
under a filter other than ``none`` is ``harness/<task>/<metric>/<filter>``), as lm-eval reports
them (accuracies as fractions). Standard errors are not figures.

The model is wrapped in lm-eval's ``HFLM`` (``pretrained=<the model object>``), so nothing is
downloaded for the model; its weights, mode and the global random states are as before when the
protocol returns. A task is either

- a **name** lm-eval knows (``arc_easy``, ``hellaswag``, ``mmlu``...): its data set comes from the
  Hugging Face Hub (or the local datasets cache), so it needs the network once; or
- a **task YAML file** (a path ending in ``.yaml``/``.yml``) in lm-eval's task format. Data files
  named in its ``dataset_kwargs.data_files`` are read relative to the YAML file, so a task on a
  local JSON/JSONL file (``dataset_path: json``) runs offline;

and ``include`` adds directories of task YAML files to the names lm-eval knows. A small offline
example ships with the package (:data:`EXAMPLE_TASK`: 8 multiple-choice questions on capitals).

lm-eval is an optional dependency: ``pip install lit-edit[lmeval]``. Asking for the protocol
without it is an ``ImportError`` naming that extra.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["EXAMPLE_TASK", "HarnessOptions", "harness_figures", "harness_options", "load_task_file", "require_lm_eval", "run_harness"]

EXAMPLE_TASK = Path(__file__).resolve().parent / "harness_tasks" / "capitals.yaml"
"""A local multiple-choice task (``lit_edit_capitals``, metric ``acc``) on a JSONL file beside it."""

INSTALL_HINT = "pip install lit-edit[lmeval]"

_TASK_FILE_SUFFIXES = (".yaml", ".yml")


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or an ``ImportError`` saying how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            f"the 'harness' evaluation protocol runs lm-evaluation-harness, which is not installed: {INSTALL_HINT} "
            f"(the lmeval extra; or pip install lm-eval) ({exc})"
        ) from exc
    return lm_eval


def _is_task_file(task: str) -> bool:
    return task.lower().endswith(_TASK_FILE_SUFFIXES)


@dataclass(frozen=True)
class HarnessOptions:
    """Which lm-evaluation-harness tasks the ``harness`` protocol runs, and how.

    Args:
        tasks: task names lm-eval knows (``arc_easy``, ``hellaswag``, ...) and/or paths of task
            YAML files (data files relative to the YAML).
        include: directories of further task YAML files (lm-eval's ``include_path``).
        limit: at most this many documents per task (``None``: all).
        num_fewshot: few-shot examples per prompt (``None``: each task's default).
    """

    tasks: Sequence[str] = ()
    include: Sequence[str] = ()
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("tasks", "include"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not all(isinstance(v, (str, Path)) and str(v).strip() for v in value):
                raise ValueError(f"harness.{name} must be a list of non-empty task names or paths, got {value!r}")
            object.__setattr__(self, name, tuple(str(v) for v in value))
        for task in self.tasks:
            if _is_task_file(task) and not Path(task).expanduser().is_file():
                raise ValueError(f"harness.tasks: task file {task} does not exist")
        for directory in self.include:
            if not Path(directory).expanduser().is_dir():
                raise ValueError(f"harness.include: {directory} is not a directory of task YAML files")
        for name in ("limit", "num_fewshot"):
            value = getattr(self, name)
            low = 1 if name == "limit" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"harness.{name} must be null or an integer >= {low}, got {value!r}")

    def describe(self) -> str:
        """The task list and settings, with a digest of every local task file and its data (so a
        changed local task changes the description, and with it the unedited-evaluation cache key)."""
        parts = []
        for task in self.tasks:
            if _is_task_file(task):
                path = Path(task).expanduser().resolve()
                parts.append(f"{path} (sha256 {_task_digest(path)[:12]})")
            else:
                parts.append(task)
        text = f"tasks {', '.join(parts)}; " + (f"{self.num_fewshot}-shot" if self.num_fewshot is not None else "tasks' default shots")
        text += f", ≤{self.limit} documents per task" if self.limit is not None else ", every document"
        if self.include:
            text += f"; task directories {', '.join(str(Path(d).expanduser().resolve()) for d in self.include)}"
        return text


def harness_options(value: Union[HarnessOptions, dict, None], protocols: Sequence[str]) -> Optional[HarnessOptions]:
    """The evaluator's ``harness`` setting checked against its protocols: with ``harness`` among
    them, lm-eval must be installed and at least one task given; without it, no tasks may be given
    (they would silently not run)."""
    if value is not None and not isinstance(value, HarnessOptions):
        if not isinstance(value, dict):
            raise TypeError(f"harness must be a HarnessOptions or a mapping of its fields, got {type(value).__name__}")
        known = {"tasks", "include", "limit", "num_fewshot"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown harness option(s) {unknown}; HarnessOptions has {sorted(known)}")
        value = HarnessOptions(**value)
    if "harness" not in protocols:
        if value is not None and value.tasks:
            raise ValueError(f"harness tasks {list(value.tasks)} are given but 'harness' is not among the protocols {list(protocols)}")
        return value
    require_lm_eval()
    if value is None or not value.tasks:
        raise ValueError("the 'harness' protocol needs at least one task: harness={'tasks': [<lm-eval task name or task YAML>, ...]}")
    return value


def _data_files(cfg: dict[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    if isinstance(files, dict):
        files = list(files.values())
    out: list[str] = []
    for f in files if isinstance(files, (list, tuple)) else [files]:
        out.extend(f if isinstance(f, (list, tuple)) else [f])
    return [str(f) for f in out]


def _task_digest(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    try:
        cfg = _read_yaml(path)
    except Exception:  # an unreadable task file is reported when it runs
        return h.hexdigest()
    for f in _data_files(cfg):
        p = Path(f)
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _read_yaml(path: Path) -> dict[str, Any]:
    require_lm_eval()
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config as load_yaml
    cfg = load_yaml(path)
    data = cfg.get("dataset_kwargs") or {}
    files = data.get("data_files")

    def resolve(f: Any) -> Any:
        if isinstance(f, (list, tuple)):
            return [resolve(x) for x in f]
        if isinstance(f, str) and "://" not in f and not Path(f).expanduser().is_absolute():
            return str((path.parent / f).resolve())
        return f

    if files is not None:
        data = dict(data, data_files={k: resolve(v) for k, v in files.items()} if isinstance(files, dict) else resolve(files))
        cfg = dict(cfg, dataset_kwargs=data)
    return cfg


def load_task_file(path: Union[str, Path]) -> dict[str, Any]:
    """A task YAML file as the config dict lm-eval runs, its data files resolved against the file's
    directory. Raises ``ValueError`` naming the file when it is no task definition."""
    path = Path(path).expanduser().resolve()
    try:
        cfg = _read_yaml(path)
    except ImportError:
        raise
    except Exception as exc:
        raise ValueError(f"harness task file {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(cfg.get("task"), str):
        raise ValueError(f"harness task file {path} defines no task (it needs a 'task: <name>' entry)")
    missing = [f for f in _data_files(cfg) if "://" not in f and not Path(f).exists()]
    if missing:
        raise ValueError(f"harness task file {path}: data file(s) {missing} do not exist")
    return cfg


def harness_figures(results: dict[str, Any]) -> dict[str, float]:
    """``{harness/<task>/<metric>[/<filter>]: value}`` from lm-eval's ``results`` section (numbers
    only; standard errors, aliases and sample counts left out)."""
    figures: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            name = f"harness/{task}/{metric}" + (f"/{filt}" if filt != "none" else "")
            figures[name] = float(value)
    return figures


@contextmanager
def _kept_state(model: nn.Module):
    """Restore the model's training flag and the global random states afterwards (lm-eval seeds
    ``random``, NumPy and torch)."""
    import numpy as np

    was_training = model.training
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_harness(model: nn.Module, tokenizer: Any, options: HarnessOptions, batch_size: int = 32) -> dict[str, float]:
    """Run ``options.tasks`` on ``model`` (in memory, on its own device) and return the figures.

    Raises ``ImportError`` naming the ``lmeval`` extra when lm-eval is not installed, and
    ``ValueError`` for an empty task list, an unreadable task file or a task that produced no
    figure.
    """
    require_lm_eval()
    if not options.tasks:
        raise ValueError("the 'harness' protocol needs at least one task (harness.tasks)")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks: list[Union[str, dict[str, Any]]] = [load_task_file(t) if _is_task_file(t) else t for t in options.tasks]
    names = [t if isinstance(t, str) else t["task"] for t in tasks]
    only_files = all(isinstance(t, dict) for t in tasks)
    manager = TaskManager(
        include_path=[str(Path(d).expanduser().resolve()) for d in options.include] or None,
        include_defaults=not only_files,  # indexing lm-eval's own task tree takes seconds; local files need none of it
    )
    log.info("lm-evaluation-harness: %s on %s", ", ".join(names), type(model).__name__)
    with _kept_state(model), torch.no_grad():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=options.limit,
            num_fewshot=options.num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
        )
    figures = harness_figures((out or {}).get("results", {}))
    silent = [n for n in names if not any(f.startswith(f"harness/{n}/") for f in figures)]
    if silent:
        raise ValueError(f"lm-evaluation-harness task(s) {silent} produced no numeric metric (results: {(out or {}).get('results')})")
    return figures
