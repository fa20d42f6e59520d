"""Files lit_edit writes and reads: the cache directory, atomic writers and one JSON/JSONL reader.

Every file lit_edit writes (statistics, templates, study tables, summaries, saved edits) goes
through :func:`atomic_write` or :func:`atomic_directory`: the content is written to a temporary
sibling first and renamed over the target, so a killed process never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

__all__ = ["atomic_directory", "atomic_write", "cache_root", "read_json_records"]


def cache_root() -> Path:
    """Directory for converted models and caches: ``$LIT_EDIT_HOME`` or ``./checkpoints``."""
    return Path(os.environ.get("LIT_EDIT_HOME", "checkpoints"))


def atomic_write(path: Union[str, Path], write) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary sibling that then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_directory(target: Path):
    """Context manager yielding a temporary sibling directory that replaces ``target`` on success."""
    return _AtomicDir(Path(target))


class _AtomicDir:
    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_json_records(path: Union[str, Path]) -> Any:
    """The content of a ``.json`` file, or the list of objects of a ``.jsonl`` file (one per line).

    Errors name the file (and, for JSONL, the line); blank JSONL lines are skipped.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return out
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
