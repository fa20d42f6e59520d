"""``EditDataModule``: edit requests as a LightningDataModule.

Training batches are *edit batches*: lists of :class:`EditRequest` (tokenization is the
editor's job, so one data module serves every editor). Evaluation sets are built from the same
requests (:attr:`EditDataModule.eval_requests`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from lit_edit.data.chat import prompt_format
from lit_edit.data.loaders import SCHEMAS, load_requests
from lit_edit.data.registry import known_dataset, unknown_source_message
from lit_edit.data.request import EditRequest, RecordError
from lit_edit.data.tokenize import encode_prompt, encode_target
from lit_edit.options import check_bool, check_int, check_str

log = logging.getLogger(__name__)

__all__ = [
    "EditDataModule",
    "EpochShuffleSampler",
    "RequestDataset",
    "RequestTooLong",
    "ResumableDataLoader",
    "max_positions",
    "overlong_requests",
]


class RequestDataset(Dataset):
    def __init__(self, requests: list[EditRequest]):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> EditRequest:
        return self.requests[i]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, a pure function of ``(seed, epoch - first_epoch)``.

    Lightning calls :meth:`set_epoch`, so a run resumed from a checkpoint sees exactly the
    order an uninterrupted run would have seen. ``first_epoch`` is the epoch a LocFT-BF round
    began at: its epochs are shuffled as those of a fit of its requests alone.
    """

    def __init__(self, n: int, seed: int = 0, first_epoch: int = 0):
        self.n, self.seed, self.epoch, self.first_epoch = n, seed, 0, first_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch - self.first_epoch)
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


def max_positions(model: Any) -> Optional[int]:
    """The number of positions ``model`` reads (``config.max_position_embeddings`` or ``n_positions``), if known."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class RequestTooLong(RecordError):
    """A request whose longest (prompt, answer) sequence exceeds the model's positions."""

    def __init__(self, request: EditRequest, field_name: str, tokens: int, positions: int):
        self.request, self.tokens, self.positions = request, tokens, positions
        super().__init__(
            request.case_id, field_name,
            f"is {tokens} tokens long with its answer, more than the {positions} positions the model reads; shorten it",
        )


def overlong_requests(requests: list[EditRequest], tokenizer: Any, positions: int) -> list[RequestTooLong]:
    """The requests with a (prompt, answer) pair longer than ``positions`` tokens (prompt + space + answer + EOS).

    Every prompt is checked with its answer: the prompt and each paraphrase with ``target_new``
    (and the prompt with ``ground_truth``), each locality and portability prompt with its answer.
    Only texts long enough to reach the limit are tokenized (a token covers at least one UTF-8
    byte, up to a few special tokens), so the check costs nothing on ordinary data.
    """
    margin = 8  # special tokens (BOS, EOS) and a SentencePiece prefix space, which cover no byte of the text
    fmt = prompt_format(tokenizer)  # prompts are checked as the model reads them (raw or inside a chat template)
    out: list[RequestTooLong] = []
    for r in requests:
        pairs = [("prompt", r.prompt, r.target_new)]
        if r.ground_truth is not None:
            pairs.append(("prompt", r.prompt, r.ground_truth))
        pairs += [(f"paraphrase_prompts[{i}]", p, r.target_new) for i, p in enumerate(r.paraphrase_prompts)]
        for kind in ("locality", "portability"):
            pairs += [(f"{kind}[{i}].prompt", pa.prompt, pa.answer) for i, pa in enumerate(getattr(r, kind))]
        for field_name, prompt, answer in pairs:
            if len(fmt.wrap(prompt).encode("utf-8")) + len(answer.encode("utf-8")) + 1 + margin <= positions:
                continue
            n = len(encode_prompt(tokenizer, prompt, fmt)) + len(encode_target(tokenizer, answer, fmt=fmt)) + 1
            if n > positions:
                out.append(RequestTooLong(r, field_name, n, positions))
                break
    return out


def _as_list(batch: list[EditRequest]) -> list[EditRequest]:
    return list(batch)


def _is_unknown_name(path: str) -> bool:
    """A bare word (no file suffix, no directory) that is neither a file nor a known benchmark."""
    p = Path(path)
    try:
        exists = p.exists()
    except (OSError, ValueError):  # a name too long for the file system is no file
        exists = False
    if known_dataset(path) is not None or exists or p.suffix in (".json", ".jsonl"):
        return False
    return "/" not in path and "\\" not in path


def _check_arguments(
    path: Any, schema: Any, limit: Any, offset: Any, batch_size: Any, shuffle: Any, eval_limit: Any,
    require_subject: Any, split: Any, seed: Any, skip_invalid: Any, requests: Any,
) -> None:
    """Refuse bad :class:`EditDataModule` arguments at construction, naming the argument."""
    if schema is not None and (not isinstance(schema, str) or schema not in SCHEMAS):
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)} (or null to detect it), got {schema!r}")
    check_int("limit", limit, minimum=1, allow_none=True)
    check_int("offset", offset, minimum=0)
    check_int("batch_size", batch_size, minimum=0)
    check_int("eval_limit", eval_limit, minimum=1, allow_none=True)
    check_int("seed", seed)
    for name, value in (("shuffle", shuffle), ("require_subject", require_subject), ("skip_invalid", skip_invalid)):
        check_bool(name, value)
    check_str("split", split, allow_none=True)
    if requests is not None:
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
            raise TypeError(f"requests must be a list of EditRequest (or of records), got {type(requests).__name__}")
        return
    if path is None:
        if schema not in (None, "lit_edit"):
            raise ValueError(f"schema={schema!r} does not apply to the demo set (its records are in the 'lit_edit' schema); leave schema null")
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, a data set name, a Hub dataset id or null, got {type(path).__name__}")
    text = str(path)
    if not text.strip():
        raise ValueError(
            "path is an empty string: pass a .json/.jsonl file, a data set name (counterfact, zsre, wikibigedit), "
            "a Hub dataset id (owner/name), or null / 'demo' for the built-in demo set"
        )
    if "\0" in text:
        raise ValueError(f"path {text!r} contains a NUL character")
    if text == "demo":
        if schema not in (None, "lit_edit"):
            raise ValueError(f"schema={schema!r} does not apply to the demo set (its records are in the 'lit_edit' schema); leave schema null")
        return
    if isinstance(path, str) and _is_unknown_name(path):
        raise ValueError(unknown_source_message(path))  # at parse time, before a model is loaded


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
        batch_size: requests per edit batch (``0`` = all in one batch); LocFT-BF's mini-batch
            (100; capped at its round's requests). ``--editing.strategy`` sets it for the
            editors whose batch is an edit batch (:mod:`lit_edit.strategy`).
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
        _check_arguments(path, schema, limit, offset, batch_size, shuffle, eval_limit, require_subject, split, seed, skip_invalid, requests)
        self.save_hyperparameters(ignore=["requests"])
        self._given = list(requests) if requests is not None else None
        self.requests: Optional[list[EditRequest]] = None
        if self._given is not None or path in (None, "demo"):
            self.load()  # in memory: check the requests (and offset/limit) now, before any model is loaded

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
                schema=hp.schema if hp.path not in (None, "demo") or self._given is not None else None,
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
        tokenizer, model = getattr(editor, "tokenizer", None), getattr(editor, "model", None)
        positions = max_positions(model)
        if tokenizer is not None and positions is not None:
            too_long = overlong_requests(requests, tokenizer, positions)
            if too_long and not self.hparams.skip_invalid:
                raise too_long[0]
            if too_long:
                drop = {id(e.request) for e in too_long}
                self.requests = [r for r in requests if id(r) not in drop]
                log.warning("skipped %d requests longer than the model's %d positions, e.g. %s",
                            len(too_long), positions, "; ".join(str(e) for e in too_long[:3]))
                if not self.requests:
                    raise ValueError(f"no edit requests fit the model's {positions} positions ({len(too_long)} skipped)")

    @property
    def eval_requests(self) -> list[EditRequest]:
        requests = self.load()
        n = self.hparams.eval_limit
        return requests if n is None else requests[:n]

    @override
    def train_dataloader(self) -> DataLoader:
        requests, first_epoch = self.load(), 0
        editor = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        select = getattr(editor, "round_requests", None)
        if callable(select):  # an editor in rounds (LocFT-BF) trains on the current round's requests only
            requests, first_epoch = select(requests)
        bs = min(self.hparams.batch_size or len(requests), len(requests))
        sampler = EpochShuffleSampler(len(requests), self.hparams.seed, first_epoch) if self.hparams.shuffle else None
        return ResumableDataLoader(
            RequestDataset(requests), batch_size=bs, sampler=sampler, collate_fn=_as_list, progress=self._batches_done
        )

    def _batches_done(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed
