"""Saving, loading and applying edits: the touched tensors plus a JSON description.

An edit directory holds ``edit.safetensors`` (the edited values of every touched tensor, named
relative to the Hugging Face model) and ``edit.json``::

    {"format": "lit_edit/1", "base_model": "smollm2-135m", "editor": "lit_edit.editors.LocFTBF",
     "init_args": {...}, "tensors_file_sha256": "...", "tensors": {"model.layers.22.mlp.down_proj.weight":
         {"shape": [...], "dtype": "float32", "original_sha256": "...", "edited_sha256": "..."}}}

plus, when the command line wrote it, the run's ``config.yaml``. Those three are lit_edit's own
files; anything else in the directory is the user's and is never touched.

**Where an edit may be written** (:func:`check_edit_path`): a new directory, an empty one, or
one that already holds a lit_edit edit, and the last only with ``overwrite=True``. A
directory with other content and no lit_edit ``edit.json``, a regular file, or a path under a
regular file is refused, whatever ``overwrite`` says, with an error naming the path.

**Crash safety.** A save writes both files under temporary names in the directory and flushes
them to disk, keeps the old tensors under a temporary name, renames the new tensors into place,
and finally renames the new ``edit.json`` into place: that rename is the commit point.
``edit.json`` records the sha256 of its tensors file, so a reader that finds the pair torn (a
save killed between the two renames) reads the matching old tensors instead. Whatever the
moment a save is killed, the directory holds the old edit or the new one, complete; the next
save or load puts the directory back in order (one log line) and removes the temporary files
the killed save left, and never anything else.

**Applying** an edit checks every stored tensor against the target model before the first
write: the name exists, the shape and dtype are exactly the target's, the values are finite,
and the target tensor is bit for bit the one the edit was made on (``original_sha256``). A
mismatch changes nothing.

**Exporting** (:func:`export_model`) writes a plain ``save_pretrained`` model and a
``lit_edit_export.json`` listing its files; the same rules apply (a new or empty directory, or
a previous lit_edit export with ``overwrite=True``, in which only the listed files are replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.io import atomic_write, fsync_dir, fsync_file, leftovers, temp_path
from lit_edit.models import load_causal_lm, model_name

log = logging.getLogger(__name__)

FORMAT = "lit_edit/1"
TENSORS_FILE = "edit.safetensors"
META_FILE = "edit.json"
RUN_CONFIG_FILE = "config.yaml"
#: The files of an edit directory that lit_edit writes (and may replace); everything else is the user's.
EDIT_FILES = (META_FILE, TENSORS_FILE, RUN_CONFIG_FILE)
EXPORT_MARKER = "lit_edit_export.json"
EXPORT_FORMAT = "lit_edit/export/1"
_META_KEYS = ("format", "base_model", "editor", "init_args", "tensors")
_TENSOR_KEYS = ("shape", "dtype", "original_sha256", "edited_sha256")

__all__ = [
    "EditFormatError",
    "EditMismatchError",
    "SavePathError",
    "apply_edit",
    "check_edit_path",
    "check_export_path",
    "export_model",
    "file_sha256",
    "load_edit",
    "read_edit",
    "tensor_sha256",
    "write_edit",
]


class EditMismatchError(ValueError):
    """The base model does not match the one an edit was made on."""


class EditFormatError(ValueError):
    """An edit directory whose files are missing, unreadable, incomplete or inconsistent."""


class SavePathError(ValueError):
    """A path lit_edit refuses to write an edit or export to (it would replace what it must not)."""


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (exact: any bit change alters it)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _non_finite(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------- where lit_edit may write


def _check_parents(path: Path, what: str) -> None:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise SavePathError(f"{what} {path}: {parent} is a regular file, so no directory can be created under it")
            return


def _foreign_entries(directory: Path, own: Iterable[str]) -> list[str]:
    own = set(own)
    temp = {lo.path.name for lo in leftovers(directory, own)}
    return sorted(e for e in os.listdir(directory) if e not in temp)


def _lenient_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_edit_meta(path: Path) -> bool:
    meta = _lenient_json(path)
    return meta is not None and meta.get("format") == FORMAT


def _check_target(path: Path, what: str, option: str) -> None:
    if not str(path).strip():
        raise SavePathError(f"empty {what} path")
    _check_parents(path, what)
    if path.is_symlink() and not path.is_dir() or (path.exists() and not path.is_dir()):
        raise SavePathError(
            f"{what} {path} is a regular file: lit_edit never replaces a file with a directory, even with {option}"
        )


def check_edit_path(directory: Union[str, Path], overwrite: bool = False) -> Path:
    """Refuse, before anything is written, a place an edit must not be saved to; returns the path.

    Allowed: a new directory, an empty one, and (``overwrite=True``) one that holds a lit_edit
    edit, in which only :data:`EDIT_FILES` are replaced and other files are kept. Refused with
    :class:`SavePathError` naming the path: an existing edit without ``overwrite``, a directory
    with content but no lit_edit ``edit.json``, a regular file, a path under a regular file.
    """
    directory = Path(directory)
    _check_target(directory, "edit directory", "overwrite")
    if not directory.is_dir():
        return directory
    entries = _foreign_entries(directory, EDIT_FILES)
    if not entries:
        return directory
    interrupted = META_FILE not in entries and TENSORS_FILE in entries and any(
        lo.name == META_FILE and _is_edit_meta(lo.path) for lo in leftovers(directory, [META_FILE])
    )
    if (META_FILE in entries and _is_edit_meta(directory / META_FILE)) or interrupted:
        if not overwrite:
            state = "the unfinished save of a lit_edit edit" if interrupted else "a lit_edit edit"
            raise SavePathError(
                f"{directory} already holds {state}: pass overwrite=True (command line: --overwrite) to replace it "
                f"(only {', '.join(EDIT_FILES)} are replaced; other files there are kept)"
            )
        return directory
    why = f"its {META_FILE} is not a lit_edit edit description" if META_FILE in entries else f"it has no {META_FILE}"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise SavePathError(
        f"{directory} is not empty and is not a lit_edit edit ({why}; it holds {shown}): lit_edit never writes into "
        "a directory it did not create, even with overwrite; choose a new or empty directory"
    )


def check_export_path(directory: Union[str, Path], overwrite: bool = False) -> Path:
    """Like :func:`check_edit_path` for :func:`export_model`: a new or empty directory, or (with
    ``overwrite``) a previous lit_edit export (it has a ``lit_edit_export.json``)."""
    directory = Path(directory)
    _check_target(directory, "export directory", "overwrite")
    if not directory.is_dir():
        return directory
    entries = _foreign_entries(directory, [EXPORT_MARKER])
    if not entries:
        return directory
    marker = _lenient_json(directory / EXPORT_MARKER) if EXPORT_MARKER in entries else None
    if marker is not None and marker.get("format") == EXPORT_FORMAT:
        if not overwrite:
            state = "a lit_edit export" if marker.get("complete") else "an unfinished lit_edit export"
            raise SavePathError(
                f"{directory} already holds {state}: pass overwrite=True (command line: --overwrite) to replace it "
                f"(only the files listed in its {EXPORT_MARKER} are replaced; other files there are kept)"
            )
        return directory
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise SavePathError(
        f"{directory} is not empty and is not a lit_edit export (no {EXPORT_MARKER}; it holds {shown}): lit_edit "
        "never writes into a directory it did not create, even with overwrite; choose a new or empty directory"
    )


# ---------------------------------------------------------------------- reading edit.json strictly


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EditFormatError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise EditFormatError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise EditFormatError(f"{meta_path}: unsupported format {meta.get('format')!r} (expected {FORMAT!r})")
    for key in _META_KEYS:
        if key not in meta:
            raise EditFormatError(f"{meta_path}: missing key {key!r} (a lit_edit edit description has {', '.join(_META_KEYS)})")
    described = meta["tensors"]
    if not isinstance(described, dict):
        raise EditFormatError(f"{meta_path}: 'tensors' must map tensor names to their descriptions")
    if not described:
        raise EditFormatError(f"{meta_path}: 'tensors' is empty: the edit describes no tensor")
    for name, info in described.items():
        if not isinstance(info, dict):
            raise EditFormatError(f"{meta_path}: tensor {name!r}: expected an object with {', '.join(_TENSOR_KEYS)}")
        for key in _TENSOR_KEYS:
            if key not in info:
                raise EditFormatError(f"{meta_path}: tensor {name!r} lacks the key {key!r}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise EditFormatError(f"{meta_path}: tensor {name!r}: 'shape' must be a list of sizes, found {shape!r}")
        if not isinstance(getattr(torch, str(info["dtype"]), None), torch.dtype):
            raise EditFormatError(f"{meta_path}: tensor {name!r}: unknown dtype {info['dtype']!r}")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for bad headers and truncated data
        raise EditFormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- crash recovery


def _pair_ok(meta: Optional[dict[str, Any]], tensors_path: Path, hashes: dict[Path, str]) -> bool:
    """Whether ``tensors_path`` is the tensors file ``meta`` was committed with."""
    if meta is None or not tensors_path.is_file():
        return False
    expected = meta.get("tensors_file_sha256")
    if expected is None:
        return True  # an edit written before lit_edit recorded the file's hash: its per-tensor hashes decide
    if tensors_path not in hashes:
        hashes[tensors_path] = file_sha256(tensors_path)
    return hashes[tensors_path] == expected


def _settle(directory: Path) -> Optional[Path]:
    """Bring back to one consistent edit a directory a killed save left behind.

    Returns the tensors file that belongs with ``edit.json`` (normally ``edit.safetensors``), or
    ``None`` when none does. Only lit_edit's temporary files of dead processes are renamed or
    removed; while the saving process still runs, nothing is changed.
    """
    meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
    found = leftovers(directory, EDIT_FILES)
    meta = _lenient_json(meta_path)
    hashes: dict[Path, str] = {}
    done = []
    chosen: Optional[Path] = tensors_path if _pair_ok(meta, tensors_path, hashes) else None
    try:
        if chosen is None and tensors_path.is_file():  # killed after the tensors' rename: finish the commit
            for lo in found:
                if lo.name == META_FILE and lo.kind == "tmp" and not lo.owner_alive:
                    new = _lenient_json(lo.path)
                    if new is not None and new.get("tensors_file_sha256") and _pair_ok(new, tensors_path, hashes):
                        os.replace(lo.path, meta_path)
                        fsync_dir(directory)
                        meta, chosen = new, tensors_path
                        done.append("completed the interrupted save (new edit)")
                        break
        if chosen is None and meta is not None:  # otherwise the kept previous tensors belong with edit.json
            for lo in found:
                if lo.name == TENSORS_FILE and lo.path.is_file() and _pair_ok(meta, lo.path, hashes):
                    if lo.owner_alive:
                        return lo.path  # a save in progress: read its copy, change nothing
                    try:
                        os.replace(lo.path, tensors_path)
                    except OSError as e:  # e.g. a read-only directory: read the copy, repair nothing
                        log.warning("%s: could not repair after an interrupted lit_edit save (%s)", directory, e)
                        return lo.path
                    fsync_dir(directory)
                    chosen = tensors_path
                    done.append("restored the previous edit's tensors (old edit)")
                    break
    except OSError as e:  # e.g. a read-only directory: read what is consistent, repair nothing
        log.warning("%s: could not repair after an interrupted lit_edit save (%s)", directory, e)
        return chosen
    if chosen is None and meta is not None:
        return None  # a damaged edit: keep whatever might help to recover it
    removed = []
    for lo in leftovers(directory, EDIT_FILES):
        if not lo.owner_alive:
            try:
                if lo.path.is_dir() and not lo.path.is_symlink():
                    shutil.rmtree(lo.path)
                else:
                    lo.path.unlink()
                removed.append(lo.path.name)
            except OSError:
                pass
    if done or removed:
        log.warning(
            "%s: %s; removed %d temporary file(s) an interrupted lit_edit save left (%s)",
            directory, "; ".join(done) or "the edit is intact", len(removed), ", ".join(removed) or "none",
        )
    return chosen


# ---------------------------------------------------------------------- write / read / apply


def write_edit(
    directory: Union[str, Path],
    edited: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    base_model: str,
    editor: str,
    init_args: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write an edit directory (``edit.safetensors`` + ``edit.json``), crash-safely (module docstring).

    ``overwrite=True`` replaces an existing lit_edit edit there (its other files are kept);
    without it an existing edit is refused. Non-finite edited values are refused, naming the tensor.
    """
    from safetensors.torch import save_file

    if not edited:
        raise ValueError("nothing to save: the editor has not touched any tensor yet (run an edit first)")
    missing = [k for k in edited if k not in originals]
    if missing:
        raise ValueError(f"no recorded original for {missing}: every saved tensor needs its original value")
    tensors = {k: v.detach().cpu().contiguous() for k, v in edited.items()}
    for name, t in tensors.items():
        if _non_finite(t):
            raise ValueError(f"refusing to save the edit: tensor {name!r} holds non-finite values (NaN or inf)")
    directory = check_edit_path(directory, overwrite)
    meta = {
        "format": FORMAT,
        "base_model": base_model,
        "editor": editor,
        "init_args": init_args,
        "tensors": {
            k: {
                "shape": list(v.shape),
                "dtype": str(v.dtype).replace("torch.", ""),
                "original_sha256": tensor_sha256(originals[k]),
                "edited_sha256": tensor_sha256(v),
            }
            for k, v in tensors.items()
        },
        **(extra or {}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
    if meta_path.exists() or leftovers(directory, EDIT_FILES):
        if _settle(directory) is not None:  # a damaged previous edit (overwrite=True) is simply replaced
            _record_file_hash(meta_path, tensors_path)
    new_tensors, new_meta, backup = temp_path(tensors_path), temp_path(meta_path), None
    committed = moved = False
    try:
        save_file(tensors, str(new_tensors), metadata={"format": FORMAT})
        fsync_file(new_tensors)
        meta["tensors_file_sha256"] = file_sha256(new_tensors)
        new_meta.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        fsync_file(new_meta)
        if tensors_path.exists():
            backup = temp_path(tensors_path, "old")
            try:
                os.link(tensors_path, backup)
            except OSError:  # no hard links here: a copy does as well
                shutil.copyfile(tensors_path, backup)
                fsync_file(backup)
            fsync_dir(directory)
        os.replace(new_tensors, tensors_path)
        moved = True
        fsync_dir(directory)
        os.replace(new_meta, meta_path)  # the commit point
        committed = True
        fsync_dir(directory)
    except BaseException:
        if moved and not committed:  # put the previous tensors back (or, for a new edit, remove the uncommitted ones)
            if backup is not None:
                os.replace(backup, tensors_path)
            else:
                tensors_path.unlink(missing_ok=True)
        for path in (new_tensors, new_meta):
            path.unlink(missing_ok=True)
        raise
    finally:
        if backup is not None:
            backup.unlink(missing_ok=True)
    return directory


def _record_file_hash(meta_path: Path, tensors_path: Path) -> None:
    """Give an edit written before lit_edit recorded its tensors file's hash that hash (so a torn overwrite is detectable)."""
    meta = _lenient_json(meta_path)
    if meta is None or meta.get("tensors_file_sha256") or not tensors_path.is_file():
        return
    try:
        stored = _load_tensors(tensors_path)
        if any(name not in stored or tensor_sha256(stored[name]) != info["edited_sha256"] for name, info in meta["tensors"].items()):
            return  # already damaged: nothing to protect
    except (EditFormatError, KeyError, TypeError, AttributeError):
        return
    meta["tensors_file_sha256"] = file_sha256(tensors_path)
    text = json.dumps(meta, indent=2, default=str)
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_edit(directory: Union[str, Path]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an edit directory; returns ``(description, tensors)``.

    Errors name the file: a missing or malformed ``edit.json`` (the missing key), an unreadable
    ``edit.safetensors``, a tensor that is missing, undescribed, or differs from its recorded
    hash, shape or dtype. A directory a killed save left behind is repaired first (module docstring).
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a lit_edit edit (no such directory)")
    chosen = _settle(directory)
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not a lit_edit edit (no {META_FILE})")
    meta = _read_meta(meta_path)
    if chosen is None:
        if not (directory / TENSORS_FILE).exists():
            raise EditFormatError(f"{directory / TENSORS_FILE} is missing (the edit's tensors)")
        raise EditFormatError(
            f"{directory / TENSORS_FILE} does not match {meta_path} (tensors_file_sha256 differs) and no previous copy "
            "does: the edit is damaged"
        )
    tensors = _load_tensors(chosen)
    for name, info in meta["tensors"].items():
        if name not in tensors:
            raise EditFormatError(f"{directory}: tensor {name!r} is described but missing from {TENSORS_FILE}")
        t = tensors[name]
        if list(t.shape) != info["shape"] or str(t.dtype).replace("torch.", "") != info["dtype"]:
            raise EditFormatError(
                f"{directory}: tensor {name!r} is stored as {t.dtype} {tuple(t.shape)} but described as "
                f"{info['dtype']} {tuple(info['shape'])} (corrupt edit)"
            )
        if tensor_sha256(t) != info["edited_sha256"]:
            raise EditFormatError(f"{directory}: tensor {name!r} does not match its recorded hash (corrupt edit)")
    extra = sorted(set(tensors) - set(meta["tensors"]))
    if extra:
        raise EditFormatError(f"{directory}: {TENSORS_FILE} holds tensors {meta_path.name} does not describe: {extra}")
    return meta, tensors


def _check_applicable(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    targets = {}
    for name, info in meta["tensors"].items():
        if name not in params:
            raise EditMismatchError(
                f"base model {type(model).__name__} has no tensor {name!r} (edit made on {meta['base_model']!r})"
            )
        p, t = params[name], tensors[name]
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            raise EditMismatchError(
                f"tensor {name!r} is {str(p.dtype).replace('torch.', '')} {tuple(p.shape)} in this model but "
                f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} in the edit {where} (made on {meta['base_model']!r}); "
                "the shapes must be equal and the dtypes too (load the base with the edit's dtype)"
            )
        if _non_finite(t):
            raise EditFormatError(f"{where}: tensor {name!r} holds non-finite values (NaN or inf): refusing to apply it")
        if tensor_sha256(p) != info["original_sha256"]:
            raise EditMismatchError(
                f"tensor {name!r} differs from the one the edit was made on ({meta['base_model']!r}): "
                "refusing to apply the edit to a different base model (or one already edited)"
            )
        targets[name] = p
    return targets


@torch.no_grad()
def apply_edit(model: nn.Module, directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Write an edit into ``model`` in place; returns the replaced original tensors (CPU copies).

    Every stored tensor is checked against the target first (name, exact shape, dtype, finite
    values, original hash): a mismatch raises and changes nothing.
    """
    meta, tensors = read_edit(directory)
    targets = _check_applicable(model, meta, tensors, Path(directory))
    originals = {name: p.detach().cpu().clone() for name, p in targets.items()}
    for name, p in targets.items():
        p.copy_(tensors[name].to(p.device))
    return originals


def load_edit(
    directory: Union[str, Path], model: Optional[Union[str, nn.Module]] = None, tokenizer: Any = None, **load_kwargs: Any
) -> tuple[nn.Module, Any]:
    """Load the edit's base model (or ``model``) and apply the edit; returns ``(model, tokenizer)``."""
    meta, _ = read_edit(directory)
    if model is None:
        model = meta["base_model"]
        load_kwargs.setdefault("dtype", next(iter(meta["tensors"].values()))["dtype"])
    hf_model, tok = load_causal_lm(model, tokenizer, **load_kwargs)
    apply_edit(hf_model, directory)
    return hf_model, tok


# ---------------------------------------------------------------------- export


def _inside(directory: Path, rel: Any) -> Optional[Path]:
    """``directory / rel`` when ``rel`` is a plain relative path inside ``directory``, else ``None``."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    return directory / rel


def export_model(
    model: nn.Module,
    tokenizer: Any,
    directory: Union[str, Path],
    overwrite: bool = False,
    tensors: Optional[Iterable[str]] = None,
) -> Path:
    """Write a plain ``save_pretrained`` checkpoint (edit merged) and its ``lit_edit_export.json``.

    ``directory`` must be new or empty, or (``overwrite=True``) a previous lit_edit export, of
    which only the files it listed are replaced or removed. ``tensors`` names the parameters
    checked for non-finite values first (an editor passes the ones it touched; ``None``: all).
    """
    directory = Path(directory)
    params = dict(model.named_parameters())
    for name in params if tensors is None else tensors:
        if name in params and _non_finite(params[name].detach()):
            raise ValueError(f"refusing to export: tensor {name!r} holds non-finite values (NaN or inf)")
    check_export_path(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    stale = [lo for lo in leftovers(directory, [EXPORT_MARKER]) if not lo.owner_alive]
    for lo in stale:
        if lo.path.is_dir():
            shutil.rmtree(lo.path, ignore_errors=True)
        else:
            lo.path.unlink(missing_ok=True)
    if stale:
        log.warning("%s: removed %d temporary file(s) an interrupted lit_edit export left", directory, len(stale))
    old = _lenient_json(directory / EXPORT_MARKER) or {}
    old_files = [f for f in old.get("files", []) if _inside(directory, f) is not None]
    staging = Path(tempfile.mkdtemp(prefix=f".{EXPORT_MARKER}.{os.getpid()}.", suffix=".tmp", dir=directory))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        new_files = sorted(
            str((Path(root) / f).relative_to(staging)) for root, _, files in os.walk(staging) for f in files
        )
        new_files = [f for f in new_files if f != EXPORT_MARKER]
        clash = [f for f in new_files if f not in old_files and os.path.lexists(directory / f)]
        if clash:
            raise SavePathError(f"{directory}: exporting would replace {clash}, which lit_edit did not write there")
        for f in new_files:
            fsync_file(staging / f)

        def marker(files: list[str], complete: bool) -> None:
            record = {"format": EXPORT_FORMAT, "complete": complete, "base_model": model_name(model), "files": files}
            text = json.dumps(record, indent=2)
            atomic_write(directory / EXPORT_MARKER, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

        marker(sorted(set(old_files) | set(new_files)), complete=False)
        for f in old_files:
            if f not in new_files and (directory / f).is_file():
                (directory / f).unlink()
        for f in new_files:
            (directory / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f, directory / f)
        fsync_dir(directory)
        marker(new_files, complete=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
