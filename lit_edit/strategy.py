"""The editing strategy as one named option: ``single``, ``batched``, ``sequential``, ``sequential_batched``.

A strategy says how the requests of a run are cut into edit batches and whether each batch's
edit stays in the model, and it fixes the evaluation timing that goes with it
(docs/methods.md §1.1):

==================== ============================ ========================== ===========
strategy             batch size                   after each batch           timing
==================== ============================ ========================== ===========
single               1                            restore the weights        immediate
batched              B (default: all requests)    restore the weights        immediate
sequential           1                            keep the edit (accumulate) after-all
sequential_batched   B (required)                 keep the edit (accumulate) after-all
==================== ============================ ========================== ===========

It maps onto three settings that have always existed and still work alone:

* the batch size: ``data.batch_size`` for the editors whose dataloader batch is an edit batch
  (ROME, MEMIT, EMMET, AlphaEdit, DepthFirstFT; ``0`` = all requests), and ``model.round_size``
  for LocFT-BF, whose ``data.batch_size`` stays its mini-batch (``None`` = all requests in one
  round; :class:`~lit_edit.editors.LocFTBF` runs successive rounds);
* ``model.accumulate`` of the editor (keep, or restore after each batch / round);
* ``timing`` of the :class:`~lit_edit.evaluation.EditEvaluation` callback.

From the command line it is one option, ``--editing.strategy NAME`` (with ``--editing.batch_size
B`` for the batched ones; named ``editing`` so as not to clash with the Trainer's DDP
``--trainer.strategy``); :class:`lit_edit.cli.EditCLI` sets the three settings from it. From
Python: ``EditingStrategy("sequential_batched", 16).settings(MEMIT)`` returns them, and
:func:`apply_strategy` sets them on an editor, a data module and callbacks built by hand. In both
a setting that was chosen explicitly and contradicts the strategy is an error naming both; a
setting left at its default takes the strategy's value.

Every run records its strategy (declared, or inferred from the three settings when no strategy
was given) with the evaluation timing, the model and the data: :func:`run_record`, written into
the logged hyperparameters, ``summary.json``, the printed table and a saved edit's ``edit.json``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

log = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES",
    "EditingStrategy",
    "StrategyConflict",
    "apply_strategy",
    "check_editor_options",
    "check_run",
    "data_record",
    "infer_strategy",
    "init_default",
    "resolve_setting",
    "run_record",
]

#: Strategy name -> what it does.
STRATEGIES: dict[str, str] = {
    "single": "one request per edit, scored right after it, then the original weights are restored",
    "batched": "one edit per batch of B requests (default: all), scored right after it, then restored",
    "sequential": "one request per edit, edits accumulate, every request scored on the final model",
    "sequential_batched": "batches of B requests edited one after another, edits accumulate, scored on the final model",
}

#: The option names as the command line spells them (also used in error messages from Python).
STRATEGY_OPTION = "editing.strategy"
BATCH_OPTION = "editing.batch_size"
ALL = "all"


class StrategyConflict(ValueError):
    """An explicit setting contradicts the editing strategy (the message names both)."""


def _valid() -> str:
    return ", ".join(STRATEGIES)


@dataclass(frozen=True)
class EditingStrategy:
    """A named editing strategy and its batch size (see the module docstring).

    Args:
        name: ``single``, ``batched``, ``sequential`` or ``sequential_batched`` (``-`` is read
            as ``_``).
        batch_size: requests per edit batch (LocFT-BF: per round). ``single`` / ``sequential``:
            1 (or left ``None``); ``batched``: a positive number or ``"all"`` (``None`` = all);
            ``sequential_batched``: a positive number, required.

    Invalid values raise ``ValueError`` (``TypeError`` for a value of the wrong kind) naming the
    option and listing the valid values.
    """

    name: str
    batch_size: Union[int, str, None] = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str):
            raise TypeError(f"{STRATEGY_OPTION} must be one of {_valid()}, got {type(name).__name__} {name!r}")
        name = name.strip().lower().replace("-", "_")
        if name not in STRATEGIES:
            raise ValueError(f"{STRATEGY_OPTION} must be one of {_valid()}, got {self.name!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "batch_size", self._check_batch_size(name, self.batch_size))

    @staticmethod
    def _check_batch_size(name: str, size: Any) -> Union[int, str]:
        if isinstance(size, str):
            text = size.strip().lower()
            if text == ALL:
                if name != "batched":
                    one = name in ("single", "sequential")
                    raise ValueError(
                        f"{BATCH_OPTION} 'all' applies to the batched strategy only; {STRATEGY_OPTION} {name} "
                        + ("edits one request at a time (batch size 1)" if one else "needs a positive batch size")
                    )
                return ALL
            if text.isdigit():
                size = int(text)
            else:
                raise ValueError(f"{BATCH_OPTION} must be a positive integer or 'all' (batched only), got {size!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise TypeError(f"{BATCH_OPTION} must be a positive integer or 'all', got {type(size).__name__} {size!r}")
        if size is not None and size < 1:
            hint = " ('all' = every request in one batch)" if name == "batched" else ""
            raise ValueError(f"{BATCH_OPTION} must be a positive integer{hint}, got {size!r}")
        if name in ("single", "sequential"):
            if size not in (None, 1):
                other = "batched" if name == "single" else "sequential_batched"
                raise ValueError(
                    f"{STRATEGY_OPTION} {name} edits one request at a time (batch size 1), but {BATCH_OPTION} is {size}; "
                    f"use {STRATEGY_OPTION} {other} for batches of {size}"
                )
            return 1
        if name == "batched":
            return ALL if size is None else size
        if size is None:
            raise ValueError(
                f"{STRATEGY_OPTION} sequential_batched needs a positive {BATCH_OPTION} (requests per batch, e.g. "
                f"--{BATCH_OPTION} 16)"
            )
        return size

    # ------------------------------------------------------------------ construction

    @classmethod
    def parse(cls, value: Any, batch_size: Any = None) -> Optional[EditingStrategy]:
        """``value`` (a name, a mapping ``{name|strategy, batch_size}``, an instance or ``None``) as a strategy."""
        if value is None:
            if batch_size is not None:
                raise ValueError(f"{BATCH_OPTION} ({batch_size!r}) is given without {STRATEGY_OPTION}: name a strategy ({_valid()})")
            return None
        if isinstance(value, EditingStrategy):
            return value if batch_size is None else cls(value.name, batch_size)
        if isinstance(value, dict):
            data = dict(value)
            name = data.pop("name", data.pop("strategy", None))
            size = data.pop("batch_size", batch_size)
            if data:
                raise ValueError(f"unknown editing option(s) {sorted(data)}; give strategy and batch_size")
            return cls.parse(name, size) if name is not None else cls.parse(None, size)
        return cls(value, batch_size)

    # ------------------------------------------------------------------ what it implies

    @property
    def accumulate(self) -> bool:
        """Whether each batch's edit stays in the model (the sequential strategies)."""
        return self.name in ("sequential", "sequential_batched")

    @property
    def timing(self) -> str:
        """The evaluation timing that goes with the strategy."""
        return "after-all" if self.accumulate else "immediate"

    @property
    def all_requests(self) -> bool:
        """One batch holding every request (``batched`` with batch size ``all``)."""
        return self.batch_size == ALL

    @property
    def label(self) -> str:
        """``sequential_batched (batch size 16)``, ``batched (batch size all)``, ``single``."""
        return self.name if self.name in ("single", "sequential") else f"{self.name} (batch size {self.batch_size})"

    def settings(self, editor: Any) -> dict[str, Any]:
        """The settings this strategy gives an editor class (or instance), by option name:
        ``model.accumulate``, the batch size (``data.batch_size``, 0 = all requests; LocFT-BF:
        ``model.round_size``, ``None`` = all) and ``timing`` (of the evaluation callback)."""
        cls = editor if isinstance(editor, type) else type(editor)
        out: dict[str, Any] = {"model.accumulate": self.accumulate}
        if getattr(cls, "edits_in_rounds", False):
            out["model.round_size"] = None if self.all_requests else self.batch_size
        else:
            out["data.batch_size"] = 0 if self.all_requests else self.batch_size
        out["timing"] = self.timing
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "batch_size": self.batch_size, "accumulate": self.accumulate, "evaluation_timing": self.timing}


# ---------------------------------------------------------------------- explicit settings vs the strategy


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def resolve_setting(
    strategy: EditingStrategy, option: str, value: Any, default: Any, wanted: Any, explicit: bool = False, where: str = ""
) -> Any:
    """The value ``option`` takes under ``strategy``: ``wanted`` when the current ``value`` is
    already that or is the ``default`` (not chosen); a ``value`` chosen explicitly (``explicit``,
    or different from the default) that differs from ``wanted`` raises :class:`StrategyConflict`."""
    if value == wanted and type(value) is type(wanted):
        return wanted
    if not explicit and value == default and type(value) is type(default):
        return wanted
    unit = "round" if option == "model.round_size" else "batch"
    if option == "model.accumulate":
        why = "keeps every batch's edit" if wanted else "restores the weights after each batch"
    elif option == "timing":
        why = "scores " + ("every request on the final model" if wanted == "after-all" else "each batch right after its edit")
    elif wanted in (0, None):
        why = f"edits every request in one {unit}"
    else:
        why = "edits one request at a time" if wanted == 1 else f"edits {unit}es of {wanted} requests"
    raise StrategyConflict(
        f"--{STRATEGY_OPTION} {strategy.name}"
        + (f" --{BATCH_OPTION} {strategy.batch_size}" if strategy.name not in ("single", "sequential") else "")
        + f" {why} ({option} {_show(wanted)}), but {option} is {_show(value)}{where}: drop that setting (the strategy "
        f"sets it) or choose another strategy ({_valid()})"
    )


def init_default(cls: type, name: str) -> Any:
    """The default of ``name`` in the ``__init__`` signatures along ``cls``'s MRO (``inspect.Parameter.empty`` if none)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return inspect.Parameter.empty


def _set_hparam(obj: Any, name: str, value: Any) -> None:
    """Set ``obj.hparams[name]`` (and the logged initial copy)."""
    obj.hparams[name] = value
    initial = getattr(obj, "_hparams_initial", None)
    if initial is not None:
        initial[name] = value


def _evaluation_callbacks(callbacks: Optional[Iterable[Any]]) -> list[Any]:
    from lit_edit.evaluation.callback import EditEvaluation

    return [c for c in (callbacks or []) if isinstance(c, EditEvaluation)]


def apply_strategy(
    strategy: Union[EditingStrategy, str, None],
    editor: Any,
    datamodule: Any = None,
    callbacks: Optional[Iterable[Any]] = None,
    batch_size: Any = None,
) -> Optional[EditingStrategy]:
    """Configure an editor, its data module and evaluation callbacks (built by hand) for a strategy.

    Sets ``editor.hparams["accumulate"]``, the batch size (``datamodule``'s ``batch_size``, or the
    LocFT-BF editor's ``round_size``) and each :class:`~lit_edit.evaluation.EditEvaluation`'s
    ``timing``, and records the strategy on the editor (``editor.editing_strategy``; the run's
    records then name it). A value that differs from both its default and the strategy's is
    refused with :class:`StrategyConflict` naming both. ``strategy`` may be a name (then
    ``batch_size`` goes with it) or ``None`` (nothing is changed). Returns the strategy.

        strategy = apply_strategy("sequential_batched", editor, datamodule, [evaluation], batch_size=16)
        L.Trainer(callbacks=[evaluation], max_epochs=...).fit(editor, datamodule=datamodule)
    """
    strategy = EditingStrategy.parse(strategy, batch_size)
    if strategy is None:
        return None
    from lit_edit.data.datamodule import EditDataModule
    from lit_edit.evaluation.callback import EditEvaluation

    cls = type(editor)
    wanted = strategy.settings(cls)
    hp = editor.hparams
    if "accumulate" not in hp:
        raise StrategyConflict(
            f"{cls.__name__} has no accumulate option: --{STRATEGY_OPTION} cannot choose whether its edits are kept"
        )
    updates: dict[tuple[Any, str], Any] = {}
    updates[(editor, "accumulate")] = resolve_setting(
        strategy, "model.accumulate", hp["accumulate"], init_default(cls, "accumulate"), wanted["model.accumulate"]
    )
    if "model.round_size" in wanted:
        updates[(editor, "round_size")] = resolve_setting(
            strategy, "model.round_size", hp.get("round_size"), init_default(cls, "round_size"), wanted["model.round_size"]
        )
    elif datamodule is not None:
        dm_default = init_default(type(datamodule), "batch_size")
        if dm_default is inspect.Parameter.empty:
            dm_default = init_default(EditDataModule, "batch_size")
        updates[(datamodule, "batch_size")] = resolve_setting(
            strategy, "data.batch_size", datamodule.hparams.get("batch_size"), dm_default, wanted["data.batch_size"]
        )
    timing_default = init_default(EditEvaluation, "timing")
    timings = [(cb, resolve_setting(strategy, "timing", cb.timing, timing_default, wanted["timing"], where=f" ({type(cb).__name__})"))
               for cb in _evaluation_callbacks(callbacks)]
    check_editor_options(editor, strategy)
    for (obj, name), value in updates.items():  # nothing is changed before every check has passed
        _set_hparam(obj, name, value)
    for cb, timing in timings:
        cb.timing = timing
    editor.editing_strategy = strategy
    log.info("editing strategy %s: %s", strategy.label, ", ".join(f"{k} {_show(v)}" for k, v in wanted.items()))
    return strategy


def check_editor_options(editor: Any, strategy: EditingStrategy) -> None:
    """Refuse editor options a strategy cannot run with (a LoRA adapter cannot be restored or split into rounds)."""
    hp = editor.hparams
    if hp.get("lora_rank") and not strategy.accumulate:
        raise StrategyConflict(
            f"--{STRATEGY_OPTION} {strategy.name} restores the weights after each batch, which model.lora_rank "
            f"({hp['lora_rank']}) cannot do (the adapter is merged when the fit ends); drop lora_rank or use a sequential strategy"
        )
    if hp.get("lora_rank") and getattr(type(editor), "edits_in_rounds", False) and not strategy.all_requests:
        raise StrategyConflict(
            f"--{STRATEGY_OPTION} {strategy.label} runs LocFT-BF in rounds, which model.lora_rank cannot do "
            "(one adapter per fit); drop lora_rank"
        )


# ---------------------------------------------------------------------- what a run did


def _batches(n: Optional[int], size: Optional[int]) -> Optional[int]:
    if n is None:
        return None
    return 1 if not size or size >= n else math.ceil(n / size)


def infer_strategy(accumulate: bool, batch_size: Optional[int], num_requests: Optional[int]) -> tuple[str, Union[int, str, None]]:
    """``(name, batch size)`` of the named strategy that the old settings amount to: edits kept or
    restored after each batch, ``batch_size`` requests per batch (``0`` / ``None`` = all).
    One batch of every request kept is ``sequential_batched`` with the number of requests as its
    batch size (``"all"`` when it is unknown)."""
    one_batch = not batch_size or (num_requests is not None and batch_size >= num_requests)
    size: Union[int, str, None] = (num_requests if num_requests else ALL) if one_batch else batch_size
    if size == 1:
        return ("sequential" if accumulate else "single"), 1
    if not accumulate:
        return "batched", ALL if one_batch else size
    return "sequential_batched", size


def _batch_setting(editor: Any, trainer: Any) -> tuple[str, Optional[int]]:
    """``(option, value)`` of the setting that is the editor's batch size in this fit."""
    if getattr(type(editor), "edits_in_rounds", False):
        return "model.round_size", editor.hparams.get("round_size")
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    hp = getattr(datamodule, "hparams", None)
    size = hp.get("batch_size") if hp is not None and hasattr(hp, "get") else None
    if size is None and trainer is not None:  # a dataloader handed to fit() directly
        loader = getattr(getattr(trainer, "fit_loop", None), "_combined_loader", None)
        size = getattr(loader, "batch_size", None) if loader is not None else None
    return "data.batch_size", size


def _num_requests(trainer: Any) -> Optional[int]:
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    requests = getattr(datamodule, "requests", None)
    return len(requests) if isinstance(requests, list) else None


def _timing(trainer: Any) -> Optional[str]:
    callbacks = _evaluation_callbacks(getattr(trainer, "callbacks", None) if trainer is not None else None)
    return callbacks[0].timing if callbacks else None


def check_run(editor: Any, trainer: Any) -> None:
    """At fit time: a declared strategy's settings are still in place (else :class:`StrategyConflict`)."""
    strategy: Optional[EditingStrategy] = getattr(editor, "editing_strategy", None)
    if strategy is None:
        return
    wanted = strategy.settings(type(editor))
    option, size = _batch_setting(editor, trainer)
    current = {"model.accumulate": editor.hparams.get("accumulate"), option: size}
    if option == "data.batch_size" and size is None:
        current.pop(option)  # no data module to read it from
    for cb in _evaluation_callbacks(getattr(trainer, "callbacks", None)):
        current["timing"] = cb.timing
    for key, value in current.items():
        resolve_setting(strategy, key, value, object(), wanted[key], explicit=True)


def data_record(trainer: Any) -> dict[str, Any]:
    """The edit requests of a fit: source, schema, offset, limit, split and count."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    out: dict[str, Any] = {}
    hp = getattr(datamodule, "hparams", None)
    if hp is not None and hasattr(hp, "get"):
        given = getattr(datamodule, "_given", None) is not None
        path = hp.get("path")
        out["source"] = "given requests" if given else ("demo" if path in (None, "demo") else str(path))
        for key in ("schema", "split", "offset", "limit", "seed", "shuffle"):
            if key in hp:
                out[key] = hp.get(key)
    n = _num_requests(trainer)
    if n is not None:
        out["num_requests"] = n
    return out


def run_record(editor: Any, trainer: Any = None) -> dict[str, Any]:
    """What a fit of ``editor`` under ``trainer`` is: ``{"editor", "model", "strategy": {...}, "data": {...}}``.

    ``strategy`` holds ``name``, ``batch_size`` (``"all"`` or a number), ``accumulate``,
    ``evaluation_timing`` (``None`` without an evaluation callback), ``batches`` (edit batches,
    LocFT-BF: rounds, when the number of requests is known) and ``declared`` (``True`` when it
    was given as ``editing.strategy``, ``False`` when inferred from the other settings).
    """
    from lit_edit.evaluation.report import model_label

    declared: Optional[EditingStrategy] = getattr(editor, "editing_strategy", None)
    n = _num_requests(trainer)
    accumulate = editor.hparams.get("accumulate", True)
    option, size = _batch_setting(editor, trainer)
    if declared is not None:
        name, batch_size, accumulate = declared.name, declared.batch_size, declared.accumulate
        size = None if declared.all_requests else declared.batch_size
    else:
        name, batch_size = infer_strategy(bool(accumulate), size, n)
    strategy = {
        "name": name,
        "batch_size": batch_size,
        "accumulate": bool(accumulate),
        "evaluation_timing": _timing(trainer),
        "batches": _batches(n, size),
        "declared": declared is not None,
        "batch_option": option,
    }
    return {
        "editor": type(editor).__name__,
        "model": model_label(editor),
        "strategy": strategy,
        "data": data_record(trainer),
    }
