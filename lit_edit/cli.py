"""Command line: ``lit-edit fit --model LocFTBF --data.path ...`` and the recipes' shared CLI.

:class:`EditCLI` is a ``LightningCLI`` whose defaults suit editing: the editor's own Trainer
settings (``Editor.trainer_defaults``, e.g. 25 epochs for LocFT-BF, no model checkpoints), a
CSV logger under ``logs/``, the :class:`~lit_edit.evaluation.EditEvaluation` callback, and a
``--save_dir`` where the edit is written after fitting (``--export_dir`` additionally writes a
merged ``save_pretrained`` model).

Every run leaves its full resolved configuration (model, data, trainer, callbacks, seed, save
directory) as ``config.yaml`` in the trainer's log directory, beside ``summary.json``, and in the
saved edit's directory; ``--config <that file>`` runs it again.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_edit.data.datamodule import EditDataModule
from lit_edit.editors.base import Editor
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


RUN_CONFIG = "config.yaml"


class EditCLI(LightningCLI):
    """LightningCLI for editors (see module docstring).

    Lightning's ``SaveConfigCallback`` writes the resolved config to ``<log dir>/config.yaml``
    (overwriting a previous one); :meth:`after_fit` writes the same file into the saved edit.
    """

    def __init__(self, model_class: Optional[type] = None, datamodule_class: type = EditDataModule, **kwargs: Any):
        configure_output()
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
            help="Directory for the saved edit (touched tensors + edit.json); default checkpoints/edits/<editor>.",
        )
        parser.add_argument(
            "--export_dir",
            type=Optional[str],
            default=None,
            help="Also write the edited model as a plain save_pretrained checkpoint here.",
        )

    def _config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        # An editor chosen on the command line (lit-edit fit --model LocFTBF) brings its own
        # Trainer defaults; they apply wherever the user left the generic default in place.
        if self.subcommand is None:
            return
        cfg = self._config()
        class_path = getattr(cfg.get("model"), "class_path", None) if hasattr(cfg.get("model"), "get") else None
        if not class_path:
            return
        import importlib

        module, _, name = class_path.rpartition(".")
        editor_cls = getattr(importlib.import_module(module), name)
        for key, value in getattr(editor_cls, "trainer_defaults", {}).items():
            dotted = f"trainer.{key}"
            if key not in Editor.trainer_defaults and cfg.get(dotted) is None:
                cfg[dotted] = value

    def after_fit(self) -> None:
        cfg = self._config()
        editor = self.model
        if not isinstance(editor, Editor) or not editor.touched:
            return
        save_dir = cfg.get("save_dir") or f"checkpoints/edits/{type(editor).__name__.lower()}"
        path = editor.save_edit(save_dir)
        config_path = self.save_run_config(path)
        log.info("edit saved to %s (run config: %s)", path, config_path.name)
        if cfg.get("export_dir"):
            editor.export(cfg.get("export_dir"))
            log.info("merged model exported to %s", cfg.get("export_dir"))

    def run_config_yaml(self) -> str:
        """This run's full resolved configuration as YAML, in the form ``--config`` reads."""
        return self._parser(self.subcommand).dump(self._config(), skip_none=False)

    def save_run_config(self, directory: Any) -> Path:
        """Write :meth:`run_config_yaml` to ``<directory>/config.yaml`` (atomically); returns its path."""
        text = self.run_config_yaml()
        return atomic_write(Path(directory) / RUN_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_recipe(editor_class: type, default_config: str, args: Optional[list[str]] = None) -> EditCLI:
    """Parse a recipe's YAML + overrides, fit, save the edit; returns the CLI object.

    The resolved config is saved as ``config.yaml`` in the log directory and in ``--save_dir``.
    """
    cli = EditCLI(
        editor_class,
        EditDataModule,
        run=False,
        args=args,
        parser_kwargs={"default_config_files": [default_config]},
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.after_fit()
    return cli


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit-edit`` console script."""
    import lit_edit.editors  # noqa: F401  (registers the editor classes for --model)

    EditCLI(args=args if args is not None else sys.argv[1:])
