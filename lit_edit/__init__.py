"""lit_edit: knowledge editing for Hugging Face causal LMs, as PyTorch Lightning modules.

The top-level names are imported lazily, so ``import lit_edit.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EditDataModule": "lit_edit.data",
    "EditRequest": "lit_edit.data",
    "load_requests": "lit_edit.data",
    "Editor": "lit_edit.editors",
    "LocFTBF": "lit_edit.editors",
    "DepthFirstFT": "lit_edit.editors",
    "ROME": "lit_edit.editors",
    "MEMIT": "lit_edit.editors",
    "EMMET": "lit_edit.editors",
    "AlphaEdit": "lit_edit.editors",
    "EditEvaluation": "lit_edit.evaluation",
    "Evaluator": "lit_edit.evaluation",
    "evaluate": "lit_edit.evaluation",
    "apply_edit": "lit_edit.edits",
    "load_edit": "lit_edit.edits",
    "load_causal_lm": "lit_edit.models",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (names resolved lazily by __getattr__)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lit_edit' has no attribute {name!r}")
