"""Editors: LightningModules that write facts into a causal LM."""

from lit_edit.editors.alphaedit import AlphaEdit
from lit_edit.editors.base import Editor
from lit_edit.editors.closed_form import ClosedFormEditor, StatisticsOptions, TemplateOptions, ValueOptions
from lit_edit.editors.emmet import EMMET
from lit_edit.editors.finetune import DepthFirstFT, FineTuneEditor, LocFTBF
from lit_edit.editors.memit import MEMIT
from lit_edit.editors.rome import ROME

__all__ = [
    "AlphaEdit",
    "EMMET",
    "MEMIT",
    "ROME",
    "ClosedFormEditor",
    "DepthFirstFT",
    "Editor",
    "FineTuneEditor",
    "LocFTBF",
    "StatisticsOptions",
    "TemplateOptions",
    "ValueOptions",
]
