"""Files lit_edit writes and reads: the cache directory, atomic writers and one JSON/JSONL reader.

Every file lit_edit writes (statistics, templates, study tables, summaries, saved edits) goes
through :func:`atomic_write` or :func:`atomic_directory`: the content is written to a temporary
name first (``.<name>.<pid>.<random>.tmp`` beside the target), flushed to disk and renamed over
the target, so a killed process never leaves a half-written file. Neither ever deletes or
replaces a directory: :func:`atomic_directory` only creates a new one (or fills an empty one).
Temporary files a killed process left behind are recognised by that name (:func:`leftovers`)
and removed by the next save to the same place once their process is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

__all__ = [
    "Leftover",
    "atomic_directory",
    "atomic_write",
    "cache_root",
    "fsync_dir",
    "fsync_file",
    "leftovers",
    "pid_alive",
    "read_json_records",
    "temp_path",
]


def cache_root() -> Path:
    """Directory for converted models and caches: ``$LIT_EDIT_HOME`` or ``./checkpoints``."""
    return Path(os.environ.get("LIT_EDIT_HOME", "checkpoints"))


def fsync_file(path: Union[str, Path]) -> None:
    """Flush a written file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Union[str, Path]) -> None:
    """Flush a directory's entries (renames, new files) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories cannot be fsynced on every platform
    finally:
        os.close(fd)


def temp_path(path: Union[str, Path], kind: str = "tmp") -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<pid>.<random>.<kind>`` (kind ``tmp`` or ``old``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[A-Za-z0-9_]+)\.(?P<kind>tmp|old)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (this process counts as running)."""
    if pid == os.getpid() or os.name == "nt":  # Windows has no signal 0: never presume another process dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


@dataclass(frozen=True)
class Leftover:
    """A temporary file or directory lit_edit made for ``name`` (in process ``pid``) and has not renamed or removed."""

    path: Path
    name: str
    pid: int
    kind: str

    @property
    def owner_alive(self) -> bool:
        return pid_alive(self.pid)


def leftovers(directory: Union[str, Path], names: Iterable[str]) -> list[Leftover]:
    """lit_edit's temporary files for the targets ``names`` in ``directory`` (see :func:`temp_path`), sorted by name."""
    directory, names = Path(directory), set(names)
    found = []
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    for entry in entries:
        m = _TEMP_NAME.match(entry)
        if m and m["name"] in names:
            found.append(Leftover(directory / entry, m["name"], int(m["pid"]), m["kind"]))
    return found


def atomic_write(path: Union[str, Path], write) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary sibling that then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_directory(target: Union[str, Path]):
    """Context manager yielding a temporary sibling directory that becomes ``target`` on success.

    ``target`` must not exist or be an empty directory: an existing directory with content, or a
    file, is refused (``FileExistsError`` naming it) before anything is written, and nothing is
    ever deleted but the temporary directory itself.
    """
    return _AtomicDir(Path(target))


def _refuse_existing(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target} exists and is not a directory: lit_edit never replaces it with a directory")
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty: lit_edit never replaces or deletes a directory's content")


class _AtomicDir:
    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        _refuse_existing(self.target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.{os.getpid()}.", suffix=".tmp", dir=self.target.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _refuse_existing(self.target)
            for root, _, files in os.walk(self.tmp):
                for name in files:
                    fsync_file(Path(root) / name)
            os.replace(self.tmp, self.target)  # POSIX: also onto an empty directory; fails if it gained content
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        fsync_dir(self.target.parent)


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
