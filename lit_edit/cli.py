"""Command line: ``lit-edit fit --model LocFTBF --data.path ...`` and the recipes' shared CLI.

:class:`EditCLI` is a ``LightningCLI`` whose defaults suit editing: the editor's own Trainer
settings (``Editor.trainer_defaults``, e.g. 25 epochs for LocFT-BF, no model checkpoints), a
CSV logger under ``logs/``, the :class:`~lit_edit.evaluation.EditEvaluation` callback, and a
``--save_dir`` where the edit is written after fitting (``--export_dir`` additionally writes a
merged ``save_pretrained`` model).

Both paths are checked before anything is loaded or fitted: each must be new, empty, or hold
what lit_edit wrote there before (an edit, an export), and the latter is replaced only with
``--overwrite``, keeping the other files of the directory; anything else (a regular file, a
directory of other files, an empty ``--save_dir=``) is an error naming the option and path.
The recipes take ``--ckpt_path`` to resume a killed fit from a Lightning checkpoint.

Seeds: an editor's result depends on ``data.seed`` (the per-epoch shuffles) and, for the
closed-form editors, ``model.templates.seed`` (the sampled context templates), not on the
global RNG. Left unset, both follow ``--seed_everything``. The editors configure their own
optimizer: ``--optimizer``/``--lr_scheduler`` are refused (use ``--model.lr``).

The editing strategy is one option, ``--editing.strategy single | batched | sequential |
sequential_batched`` with ``--editing.batch_size B`` (``all`` for batched; required for
sequential_batched): it sets the editor's ``accumulate``, the batch size (``data.batch_size``;
LocFT-BF: ``model.round_size``, its rounds) and the evaluation callbacks' ``timing``
(:mod:`lit_edit.strategy`). A setting given explicitly (on the command line, or a value other than
the recipe's default) that contradicts the strategy is an error naming both. Left unset, those
settings work alone as before; either way the run's strategy, batch size and timing are
recorded in ``summary.json``, the printed table, the logged hyperparameters and ``edit.json``. A
strategy that restores the weights after each batch (single, batched) leaves no edit to save.

Every run leaves its full resolved configuration (model, data, trainer, callbacks, seed, save
directory) as ``config.yaml`` in the trainer's log directory, beside ``summary.json``, and in the
saved edit's directory; ``--config <that file>`` runs it again.
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_edit.data.datamodule import EditDataModule
from lit_edit.editors.base import Editor
from lit_edit.edits import RUN_CONFIG_FILE, SavePathError, check_edit_path, check_export_path
from lit_edit.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["EditCLI", "configure_output", "main", "run_recipe"]

DEFAULT_TRAINER: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
}


#: Warnings editors cause on purpose: the wrapped model stays in eval mode while it is edited,
#: edit batches (lists of requests) are not moved to the device, requests need no workers.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"You have overridden `transfer_batch_to_device`",
    r".*does not have many workers.*",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`LightningModule.configure_optimizers` returned `None`",  # closed-form editors solve, they do not step
)


class _NoAdvert(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def configure_output() -> None:
    """Terminal output of the command-line tools: lit_edit's INFO lines, no expected warnings, no adverts.

    Called by the CLI and the study recipes; a library user's own process keeps its settings.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lit_edit").setLevel(logging.INFO)
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvert())


RUN_CONFIG = RUN_CONFIG_FILE
#: Values of ``ckpt_path`` Lightning resolves itself (no file to check beforehand).
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class EditCLI(LightningCLI):
    """LightningCLI for editors (see module docstring).

    Lightning's ``SaveConfigCallback`` writes the resolved config to ``<log dir>/config.yaml``
    (overwriting a previous one); :meth:`after_fit` writes the same file into the saved edit.
    """

    def __init__(self, model_class: Optional[type] = None, datamodule_class: type = EditDataModule, **kwargs: Any):
        configure_output()
        self._recipe_mode = not kwargs.get("run", True)
        trainer_defaults = dict(DEFAULT_TRAINER)
        if model_class is not None and hasattr(model_class, "trainer_defaults"):
            trainer_defaults.update(model_class.trainer_defaults)
        else:
            trainer_defaults.update(Editor.trainer_defaults)
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}) or {})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class if model_class is not None else Editor,
            datamodule_class,
            trainer_defaults=trainer_defaults,
            subclass_mode_model=model_class is None,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from jsonargparse import lazy_instance

        from lit_edit.evaluation import EditEvaluation

        parser.set_defaults({"trainer.callbacks": [lazy_instance(EditEvaluation)]})
        parser.add_argument(
            "--save_dir",
            type=Optional[str],
            default=None,
            help=(
                "Directory for the saved edit (touched tensors + edit.json + this run's config.yaml); default "
                "checkpoints/edits/<editor>. Must be new, empty, or hold a lit_edit edit (replaced only with "
                "--overwrite; other files there are kept). Checked before fitting."
            ),
        )
        parser.add_argument(
            "--export_dir",
            type=Optional[str],
            default=None,
            help=(
                "Also write the edited model as a plain save_pretrained checkpoint here. Must be new, empty, or hold "
                "a lit_edit export (replaced only with --overwrite; other files there are kept). Checked before fitting."
            ),
        )
        parser.add_argument(
            "--editing.strategy",
            type=Optional[str],
            default=None,
            help=(
                "The editing strategy: single (batch 1, restore after each, immediate evaluation), batched (batches of "
                "--editing.batch_size, default all, restore after each, immediate), sequential (batch 1, edits accumulate, "
                "after-all evaluation) or sequential_batched (batches of --editing.batch_size, accumulate, after-all). Sets "
                "model.accumulate, the batch size (data.batch_size; LocFT-BF: model.round_size) and the evaluation timing; "
                "null = those settings as given (docs/methods.md §1.1)."
            ),
        )
        parser.add_argument(
            "--editing.batch_size",
            type=Optional[Union[int, str]],
            default=None,
            help="Requests per edit batch (LocFT-BF: per round) of the strategy: a positive number, or all (batched only).",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Replace the lit_edit edit in --save_dir (and the lit_edit export in --export_dir); never anything else.",
        )
        if self._recipe_mode:
            parser.add_argument(
                "--ckpt_path",
                type=Optional[str],
                default=None,
                help="Resume the fit from this Lightning checkpoint (e.g. the last.ckpt of a ModelCheckpoint callback).",
            )
        # Unset seeds follow seed_everything (before_instantiate_classes); an explicit value wins.
        parser.set_defaults({"data.seed": None})
        try:
            parser.get_default("model.templates.seed")
        except KeyError:
            pass
        else:
            parser.set_defaults({"model.templates.seed": None})
        for action in parser._actions:
            if action.dest == "seed_everything":
                action.help = (
                    "Seed of the global RNGs (an int; true: a random one; false: none). An editor's result depends only "
                    "on data.seed (the per-epoch shuffles) and, for ROME/MEMIT/EMMET, model.templates.seed (the sampled "
                    "context templates): left unset (null), each takes this value."
                )

    def _config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _editor_class(self) -> Optional[type]:
        if self.subcommand is None:
            return self.model_class
        model = self._config().get("model")
        class_path = getattr(model, "class_path", None) if hasattr(model, "get") else None
        if not class_path:
            return None
        import importlib

        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def _error(self, message: str) -> None:
        """Stop with a command-line error (usage + message, exit status 2)."""
        self._parser(self.subcommand).error(message)

    def before_instantiate_classes(self) -> None:
        cfg = self._config()
        editor_cls = self._editor_class()
        if self.subcommand is not None and editor_cls is not None:
            # An editor chosen on the command line (lit-edit fit --model LocFTBF) brings its own
            # Trainer defaults; they apply wherever the user left the generic default in place.
            for key, value in getattr(editor_cls, "trainer_defaults", {}).items():
                dotted = f"trainer.{key}"
                if key not in Editor.trainer_defaults and cfg.get(dotted) is None:
                    cfg[dotted] = value
        self._refuse_optimizer_options(cfg, editor_cls)
        self._derive_seeds(cfg)
        self._apply_editing_strategy(cfg, editor_cls)
        if self.subcommand in (None, "fit"):
            self._check_output_paths(cfg, editor_cls)

    def _refuse_optimizer_options(self, cfg: Any, editor_cls: Optional[type]) -> None:
        if not (isinstance(editor_cls, type) and issubclass(editor_cls, Editor)):
            return
        for key in ("optimizer", "lr_scheduler"):
            if cfg.get(key) is not None:
                self._error(
                    f"--{key}: {editor_cls.__name__} configures its own optimizer (the fine-tuning editors: Adam with "
                    "their own settings; the closed-form editors: none), which --optimizer/--lr_scheduler would silently "
                    "replace. Set the learning rate with --model.lr (ROME/MEMIT/EMMET: --model.values.lr)."
                )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # kept to tell a setting given on the command line from one left at its default
        self._command_line = [str(a) for a in (args if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else [])]
        super().parse_arguments(parser, args)

    def _on_command_line(self, *keys: str) -> bool:
        tokens = getattr(self, "_command_line", [])
        return any(t == f"--{k}" or t.startswith(f"--{k}=") for t in tokens for k in keys)

    def _apply_editing_strategy(self, cfg: Any, editor_cls: Optional[type]) -> None:
        """``--editing.strategy``: set ``accumulate``, the batch size and the evaluation timing in the
        configuration (so ``config.yaml`` records them), refusing an explicit contradicting setting."""
        from lit_edit.strategy import EditingStrategy, StrategyConflict, init_default, resolve_setting

        self._editing_strategy = None
        try:
            strategy = EditingStrategy.parse(cfg.get("editing.strategy"), cfg.get("editing.batch_size"))
        except (TypeError, ValueError) as e:
            self._error(str(e))
        if strategy is None or not (isinstance(editor_cls, type) and issubclass(editor_cls, Editor)):
            return
        self._editing_strategy = strategy
        defaults = self._parser(self.subcommand).get_defaults()
        model_prefix = "model" if self.subcommand is None else "model.init_args"

        def default_of(key: str, cls: type, name: str) -> Any:
            try:
                value = defaults.get(key) if self.subcommand is None or not key.startswith("model.") else None
            except (KeyError, AttributeError, TypeError):
                value = None
            if value is None:
                value = init_default(cls, name)
            return value

        try:
            for option, wanted in strategy.settings(editor_cls).items():
                if option == "timing":
                    self._apply_strategy_timing(cfg, defaults, strategy, wanted)
                    continue
                section, name = option.split(".", 1)
                if section == "model":
                    key, cls, keys = f"{model_prefix}.{name}", editor_cls, (f"model.{name}", f"model.init_args.{name}")
                else:
                    key, cls, keys = option, EditDataModule, (option,)
                if init_default(cls, name) is inspect.Parameter.empty:
                    self._error(f"--editing.strategy: {cls.__name__} has no {name} option, which the strategy sets")
                cfg[key] = resolve_setting(strategy, option, cfg.get(key), default_of(key, cls, name), wanted,
                                           explicit=self._on_command_line(*keys))
        except StrategyConflict as e:
            self._error(str(e))

    def _apply_strategy_timing(self, cfg: Any, defaults: Any, strategy: Any, wanted: str) -> None:
        """The timing of every ``EditEvaluation`` in ``trainer.callbacks`` (given as class_path + init_args)."""
        import importlib

        from lit_edit.evaluation import EditEvaluation
        from lit_edit.strategy import init_default, resolve_setting

        callbacks = cfg.get("trainer.callbacks")
        try:
            default_callbacks = list(defaults.get("trainer.callbacks") or [])
        except (KeyError, AttributeError, TypeError):
            default_callbacks = []
        explicit = any("timing" in t for t in getattr(self, "_command_line", []))
        for i, cb in enumerate(callbacks if isinstance(callbacks, list) else []):
            class_path = getattr(cb, "class_path", None) if hasattr(cb, "get") else None
            if not class_path:
                continue  # an instance (the default EditEvaluation): set once built (apply_strategy)
            module, _, name = class_path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
            if not (isinstance(cls, type) and issubclass(cls, EditEvaluation)):
                continue
            default = init_default(cls, "timing")
            if i < len(default_callbacks) and getattr(default_callbacks[i], "class_path", None) == class_path:
                init = getattr(default_callbacks[i], "init_args", None)
                if init is not None and init.get("timing") is not None:
                    default = init.get("timing")
            init_args = cb.get("init_args")
            if init_args is None:
                from jsonargparse import Namespace

                init_args = cb["init_args"] = Namespace()
            current = init_args.get("timing") if init_args.get("timing") is not None else init_default(cls, "timing")
            init_args["timing"] = resolve_setting(strategy, "timing", current, default, wanted, explicit=explicit,
                                                  where=f" (trainer.callbacks: {name})")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        strategy = getattr(self, "_editing_strategy", None)
        if strategy is not None and isinstance(self.model, Editor):
            from lit_edit.strategy import StrategyConflict, apply_strategy

            try:  # records the strategy on the editor; sets the timing of callbacks built as instances
                apply_strategy(strategy, self.model, self.datamodule, self.trainer.callbacks)
            except StrategyConflict as e:
                self._error(str(e))

    def _derive_seeds(self, cfg: Any) -> None:
        """Unset ``data.seed`` / ``model.templates.seed`` take the value of ``seed_everything``."""
        seed = cfg.get("seed_everything")
        base = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        if cfg.get("data") is not None and cfg.get("data.seed") is None:
            cfg["data.seed"] = base
            log.info("data.seed = %d (from seed_everything)", base)
        if self.subcommand is None:
            if cfg.get("model.templates") is not None and cfg.get("model.templates.seed") is None:
                cfg["model.templates.seed"] = base
                log.info("model.templates.seed = %d (from seed_everything)", base)
            return
        # lit-edit fit --model ROME: the editor's arguments have no "unset"; the default 0 follows seed_everything.
        from lit_edit.editors.closed_form import TemplateOptions

        templates = cfg.get("model.init_args.templates") if hasattr(cfg.get("model"), "get") else None
        if templates is not None and hasattr(templates, "get") and templates.get("seed") in (None, TemplateOptions.seed):
            templates["seed"] = base

    def default_save_dir(self, editor_name: str) -> str:
        """Where the edit goes when ``--save_dir`` is not given: ``checkpoints/edits/<editor name, lower case>``."""
        return f"checkpoints/edits/{editor_name.lower()}"

    def _check_output_paths(self, cfg: Any, editor_cls: Optional[type]) -> None:
        """Refuse, before anything is loaded or fitted, a save/export path the run could not write."""
        overwrite = bool(cfg.get("overwrite"))
        for option in ("save_dir", "export_dir", "ckpt_path"):
            value = cfg.get(option)
            if value is not None and not str(value).strip():
                self._error(f"--{option} is empty: give a path" + (" (or leave the option out)" if option != "export_dir" else ""))
        save_dir = cfg.get("save_dir") or self.default_save_dir(editor_cls.__name__ if editor_cls else "editor")
        try:
            check_edit_path(save_dir, overwrite)
        except SavePathError as e:
            self._error(f"--save_dir: {e}")
        export_dir = cfg.get("export_dir")
        if export_dir:
            if Path(export_dir).resolve() == Path(save_dir).resolve():
                self._error(f"--export_dir {export_dir} is also the --save_dir: give the exported model a directory of its own")
            try:
                check_export_path(export_dir, overwrite)
            except SavePathError as e:
                self._error(f"--export_dir: {e}")
        ckpt_path = cfg.get("ckpt_path") if self.subcommand is None else None
        if ckpt_path and ckpt_path not in _SPECIAL_CKPT_PATHS and "://" not in ckpt_path and not Path(ckpt_path).is_file():
            self._error(f"--ckpt_path {ckpt_path}: no such checkpoint file")

    def after_fit(self) -> None:
        cfg = self._config()
        editor = self.model
        if not isinstance(editor, Editor) or not editor.touched:
            return
        if editor.hparams.get("accumulate", True) is False:
            strategy = (editor.run_record.get("strategy") or {}).get("name", "this strategy")
            log.info("no edit saved: %s restores the weights after each batch (accumulate false), so the model ends unedited",
                     strategy)
            return
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not trainer.is_global_zero:
            return  # one process writes the edit
        overwrite = bool(cfg.get("overwrite"))
        save_dir = cfg.get("save_dir") or self.default_save_dir(type(editor).__name__)
        path = editor.save_edit(save_dir, overwrite=overwrite)
        config_path = self.save_run_config(path)
        log.info("edit saved to %s (run config: %s)", path, config_path.name)
        if cfg.get("export_dir"):
            editor.export(cfg.get("export_dir"), overwrite=overwrite)
            log.info("merged model exported to %s", cfg.get("export_dir"))

    def run_config_yaml(self) -> str:
        """This run's full resolved configuration as YAML, in the form ``--config`` reads."""
        return self._parser(self.subcommand).dump(self._config(), skip_none=False)

    def save_run_config(self, directory: Any) -> Path:
        """Write :meth:`run_config_yaml` to ``<directory>/config.yaml`` (atomically); returns its path."""
        text = self.run_config_yaml()
        return atomic_write(Path(directory) / RUN_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_recipe(editor_class: type, default_config: str, args: Optional[list[str]] = None) -> EditCLI:
    """Parse a recipe's YAML + overrides, fit (resuming from ``--ckpt_path`` if given), save the edit;
    returns the CLI object.

    The resolved config is saved as ``config.yaml`` in the log directory and in ``--save_dir``.
    """
    cli = EditCLI(
        editor_class,
        EditDataModule,
        run=False,
        args=args,
        parser_kwargs={"default_config_files": [default_config]},
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli._config().get("ckpt_path"))
    cli.after_fit()
    return cli


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit-edit`` console script."""
    import lit_edit.editors  # noqa: F401  (registers the editor classes for --model)

    EditCLI(args=args if args is not None else sys.argv[1:])
