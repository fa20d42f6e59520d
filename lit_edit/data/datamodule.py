"""``EditDataModule``: edit requests as a LightningDataModule.

Training batches are *edit batches*: lists of :class:`EditRequest` (tokenization is the
editor's job, so one data module serves every editor). Evaluation sets are built from the same
requests (:attr:`EditDataModule.eval_requests`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from lit_edit.data.loaders import SCHEMAS, load_requests
from lit_edit.data.registry import known_dataset, unknown_source_message
from lit_edit.data.request import EditRequest

log = logging.getLogger(__name__)

__all__ = ["EditDataModule", "EpochShuffleSampler", "RequestDataset", "ResumableDataLoader"]


class RequestDataset(Dataset):
    def __init__(self, requests: list[EditRequest]):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> EditRequest:
        return self.requests[i]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, a pure function of ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch`, so a run resumed from a checkpoint sees exactly the
    order an uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves its state in checkpoints.

    The state is the number of batches of the current epoch the Trainer has processed; a
    loader restored from it skips that many batches of its next epoch (whose order is the same,
    see :class:`EpochShuffleSampler`), so an interrupted run neither repeats nor loses a batch.
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._progress = progress
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        done = int(self._progress()) if self._progress is not None else 0
        return {"batches_done": done if done < len(self) else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_done", 0))

    def __iter__(self):
        it = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(it, None)
        return it


def _as_list(batch: list[EditRequest]) -> list[EditRequest]:
    return list(batch)


def _is_unknown_name(path: str) -> bool:
    """A bare word (no file suffix, no directory) that is neither a file nor a known benchmark."""
    p = Path(path)
    if known_dataset(path) is not None or p.exists() or p.suffix in (".json", ".jsonl"):
        return False
    return "/" not in path and "\\" not in path


class EditDataModule(L.LightningDataModule):
    """Edit requests from a file, a known benchmark, a ``datasets`` source or the built-in demo set.

    Args:
        path: a ``.json``/``.jsonl`` file; the name of a known benchmark (``counterfact``,
            ``zsre``, ``wikibigedit``), read from a local copy in ``$LIT_EDIT_DATA`` or
            ``<cache root>/data`` when there is one, else from the Hugging Face Hub (network;
            see :mod:`lit_edit.data.registry`); a Hub dataset id ``owner/name`` (network); or
            ``None``/``"demo"`` for the built-in demo edits.
        schema: record schema (auto-detected when ``None``): ``counterfact``,
            ``counterfact_flat``, ``zsre``, ``wikibigedit`` or ``lit_edit``.
        limit: use at most this many requests (after ``offset``).
        offset: skip this many records first.
        batch_size: requests per edit batch (LocFT-BF: 100; ``0`` = all in one batch).
        shuffle: reshuffle the edit batches every epoch (order = f(seed, epoch)).
        seed: seed of the per-epoch shuffles.
        skip_invalid: drop (and log) malformed records instead of failing on the first one.
        eval_limit: evaluate on at most this many of the requests (default: all).
        require_subject: reject requests whose subject is missing or not in the prompt
            (also enforced automatically for editors that need it).
        split: split name for ``datasets`` sources (default ``train``, or a known benchmark's
            own split of its Hub copy).
    """

    def __init__(
        self,
        path: Optional[str] = None,
        schema: Optional[str] = None,
        limit: Optional[int] = None,
        offset: int = 0,
        batch_size: int = 100,
        shuffle: bool = True,
        eval_limit: Optional[int] = None,
        require_subject: bool = False,
        split: Optional[str] = None,
        seed: int = 0,
        skip_invalid: bool = False,
        requests: Optional[list[EditRequest]] = None,
    ):
        super().__init__()
        if schema is not None and schema not in SCHEMAS:
            raise ValueError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        if requests is None and isinstance(path, str) and path != "demo" and _is_unknown_name(path):
            raise ValueError(unknown_source_message(path))  # at parse time, before a model is loaded
        self.save_hyperparameters(ignore=["requests"])
        self._given = requests
        self.requests: Optional[list[EditRequest]] = None

    def load(self) -> list[EditRequest]:
        """Read (once) and validate the requests."""
        if self.requests is None:
            hp = self.hparams
            if self._given is not None:
                source: Any = self._given
            elif hp.path in (None, "demo"):
                from lit_edit.data.demo import demo_requests

                source = [r.to_dict() for r in demo_requests()]
            else:
                source = hp.path
            self.requests = load_requests(
                source,
                schema=hp.schema if self._given is None and hp.path not in (None, "demo") else None,
                limit=hp.limit,
                offset=hp.offset,
                split=hp.split,
                require_subject=hp.require_subject,
                skip_invalid=hp.skip_invalid,
            )
            origin = "the given requests" if self._given is not None else "demo set" if hp.path in (None, "demo") else hp.path
            log.info("%d edit requests from %s", len(self.requests), origin)
        return self.requests

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        requests = self.load()
        editor = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if getattr(editor, "requires_subject", False):
            for r in requests:
                r.validate(require_subject=True)

    @property
    def eval_requests(self) -> list[EditRequest]:
        requests = self.load()
        n = self.hparams.eval_limit
        return requests if n is None else requests[:n]

    @override
    def train_dataloader(self) -> DataLoader:
        requests = self.load()
        bs = self.hparams.batch_size or len(requests)
        sampler = EpochShuffleSampler(len(requests), self.hparams.seed) if self.hparams.shuffle else None
        return ResumableDataLoader(
            RequestDataset(requests), batch_size=bs, sampler=sampler, collate_fn=_as_list, progress=self._batches_done
        )

    def _batches_done(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed
