"""Package hygiene: every module's ``__all__`` lists exactly its public definitions; top-level imports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lit_edit

MODULES = sorted(m.name for m in pkgutil.walk_packages(lit_edit.__path__, "lit_edit."))


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_the_public_definitions(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    if module.__file__.endswith("__init__.py"):
        return  # a package's __all__ re-exports its modules' names
    tree = ast.parse(Path(module.__file__).read_text())
    defined = [
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    ]
    unlisted = sorted(set(defined) - set(exported))
    assert not unlisted, f"{name} defines public names missing from __all__: {unlisted}"


def test_top_level_names():
    for name in ("LocFTBF", "DepthFirstFT", "ROME", "MEMIT", "EMMET", "Editor", "EditDataModule", "EditEvaluation", "Evaluator", "evaluate"):
        assert getattr(lit_edit, name) is not None
    assert set(lit_edit.__all__) <= set(dir(lit_edit))
