"""Editing benchmarks by name: ``--data.path counterfact`` (or ``zsre``, ``wikibigedit``).

A known name resolves, in this order, to

1. a local file in one of the directories of ``$LIT_EDIT_DATA`` (several directories are
   separated by ``os.pathsep``, ``:`` on Linux and macOS), whose name matches the data set's
   patterns, e.g. ``counterfact*.json`` or ``counterfact*.jsonl`` (case-insensitive);
2. such a file in ``<cache root>/data``, i.e. ``$LIT_EDIT_HOME/data`` or ``./checkpoints/data``
   (see :func:`lit_edit.io.cache_root`);
3. the public copy on the Hugging Face Hub, through ``datasets.load_dataset`` (this needs
   network, or a copy already in the ``datasets`` cache).

Within a directory the first matching file in sorted order wins; the file used is logged. A
local file may be in any schema of its data set's family (e.g. the original nested CounterFact
or EasyEdit's flat split of it); the schema is detected from its records. When neither a local
copy nor the Hub is available (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or a connection
error), :class:`DataUnavailableError` names the data set, the directories searched, the file
pattern expected and the environment variable to set.

Known data sets (:data:`KNOWN_DATASETS`):

``counterfact``  CounterFact (Meng et al., 2022), Hub ``azhx/counterfact`` split ``train``
                 (19,728 records in the original nested schema)
``zsre``         zsRE question answering as prepared by MEND (Mitchell et al., 2022): the
                 evaluation set used by ROME, MEMIT and EasyEdit (``zsre_mend_eval.json``,
                 read from the ROME project's public file server)
``wikibigedit``  WikiBigEdit (Thede et al., 2025), real Wikidata updates, Hub
                 ``lukasthede/WikiBigEdit`` split ``train`` (all timesteps)

Example::

    export LIT_EDIT_DATA=~/data/editing        # holds counterfact-edit-10k.json
    python recipes/locft_bf.py --data.path counterfact --data.limit 200
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lit_edit.io import cache_root

log = logging.getLogger(__name__)

__all__ = [
    "DATA_ENV",
    "DataUnavailableError",
    "KNOWN_DATASETS",
    "KnownDataset",
    "data_dirs",
    "find_local",
    "known_dataset",
    "load_from_hub",
    "unknown_source_message",
]

DATA_ENV = "LIT_EDIT_DATA"
"""Environment variable with the directories (``os.pathsep``-separated) holding local copies."""


@dataclass(frozen=True)
class KnownDataset:
    """One editing benchmark that ``--data.path <name>`` resolves.

    Attributes:
        name: the name users pass (lower case).
        patterns: ``fnmatch`` patterns of local file names (matched case-insensitively).
        schemas: schemas a local copy may be in (:data:`lit_edit.data.loaders.SCHEMAS`); the
            first is the schema of the Hub copy.
        hub_id: first argument of ``datasets.load_dataset`` (a Hub dataset id, or a builder
            such as ``"json"`` together with ``data_files``).
        split: split of the Hub copy.
        description: one line for listings and error messages.
        data_files: ``data_files`` argument of ``datasets.load_dataset``, if any.
    """

    name: str
    patterns: tuple[str, ...]
    schemas: tuple[str, ...]
    hub_id: str
    split: str
    description: str
    data_files: Optional[str] = None

    @property
    def schema(self) -> str:
        """Schema of the Hub copy."""
        return self.schemas[0]

    @property
    def hub_source(self) -> str:
        """The Hub copy in words: ``azhx/counterfact (split train)``."""
        where = self.data_files if self.data_files else self.hub_id
        return f"{where} (split {self.split})"


KNOWN_DATASETS: dict[str, KnownDataset] = {
    d.name: d
    for d in (
        KnownDataset(
            name="counterfact",
            patterns=("counterfact*.json", "counterfact*.jsonl"),
            schemas=("counterfact", "counterfact_flat", "lit_edit"),
            hub_id="azhx/counterfact",
            split="train",
            description="CounterFact (Meng et al., 2022): counterfactual single-fact edits with paraphrase and neighbourhood prompts",
        ),
        KnownDataset(
            name="zsre",
            patterns=("zsre*.json", "zsre*.jsonl"),
            schemas=("zsre", "counterfact_flat", "lit_edit"),
            hub_id="json",
            split="train",
            description="zsRE as prepared by MEND (Mitchell et al., 2022): the question-answering edits evaluated by ROME, MEMIT and EasyEdit",
            data_files="https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
        ),
        KnownDataset(
            name="wikibigedit",
            patterns=("wikibigedit*.json", "wikibigedit*.jsonl"),
            schemas=("wikibigedit", "counterfact_flat", "lit_edit"),
            hub_id="lukasthede/WikiBigEdit",
            split="train",
            description="WikiBigEdit (Thede et al., 2025): real Wikidata fact updates with locality and multi-hop questions",
        ),
    )
}


def known_dataset(source: Any) -> Optional[KnownDataset]:
    """The known data set that ``source`` names (a string, case-insensitive), else ``None``."""
    if not isinstance(source, str):
        return None
    return KNOWN_DATASETS.get(source.strip().lower())


def data_dirs() -> list[tuple[Path, str]]:
    """Directories searched for local copies, in order, each with where it comes from."""
    dirs = [(Path(p).expanduser(), f"${DATA_ENV}") for p in os.environ.get(DATA_ENV, "").split(os.pathsep) if p.strip()]
    dirs.append((cache_root() / "data", "cache root"))
    return dirs


def find_local(dataset: KnownDataset) -> Optional[Path]:
    """The local copy of ``dataset`` (first match in :func:`data_dirs`), or ``None``."""
    for directory, _ in data_dirs():
        if not directory.is_dir():
            continue
        matches = sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and any(fnmatch.fnmatch(p.name.lower(), pat) for pat in dataset.patterns)
        )
        if matches:
            if len(matches) > 1:
                log.warning(
                    "several files in %s match data set %r (%s); using %s - pass a file path to choose another",
                    directory, dataset.name, ", ".join(p.name for p in matches), matches[0].name,
                )
            return matches[0]
    return None


class DataUnavailableError(RuntimeError):
    """A known data set has no local copy and the Hub cannot be reached."""


def _offline() -> Optional[str]:
    """The variable that puts ``datasets`` offline, if one does."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]}"
    return None


def _unavailable_message(dataset: KnownDataset, reason: str) -> str:
    searched = "; ".join(f"{d} (from {origin})" for d, origin in data_dirs())
    patterns = " or ".join(dataset.patterns)
    return (
        f"data set {dataset.name!r} is not available: no local copy was found and the Hugging Face Hub "
        f"cannot be reached ({reason}).\n"
        f"  searched for {patterns} in: {searched}\n"
        f"  fix: put a copy (e.g. {dataset.patterns[0].replace('*', '')}) into a directory and set "
        f"{DATA_ENV}=<that directory> (several separated by {os.pathsep!r}), or pass the file's path "
        f"as --data.path; with network the Hub copy {dataset.hub_source} is downloaded."
    )


def load_from_hub(dataset: KnownDataset, split: Optional[str] = None) -> list[dict]:
    """The records of ``dataset``'s Hub copy (needs network or the ``datasets`` cache).

    Raises :class:`DataUnavailableError` (naming :data:`DATA_ENV`) when it cannot be loaded.
    """
    split = split or dataset.split
    log.info("data set %r: no local copy, loading %s from the Hugging Face Hub", dataset.name, dataset.hub_source)
    try:
        import datasets

        kwargs = {"data_files": dataset.data_files} if dataset.data_files else {}
        records = list(datasets.load_dataset(dataset.hub_id, split=split, **kwargs))
    except (ImportError, KeyboardInterrupt):
        raise
    except Exception as e:  # offline mode, connection errors, a moved or renamed Hub copy
        offline = _offline()
        reason = f"{offline}; {type(e).__name__}: {e}" if offline else f"{type(e).__name__}: {e}"
        raise DataUnavailableError(_unavailable_message(dataset, reason)) from e
    return records


def unknown_source_message(source: Any) -> str:
    """Error text for a source that is neither a file nor a known data set."""
    names = ", ".join(f"{d.name} ({d.description})" for d in KNOWN_DATASETS.values())
    return (
        f"data source {str(source)!r} is neither an existing file nor a known data set; "
        f"known data sets: {names}. Otherwise pass a .json/.jsonl file or a Hub dataset id (owner/name)."
    )
