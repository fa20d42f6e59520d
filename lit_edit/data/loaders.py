"""Loaders from the editing benchmarks' schemas to :class:`EditRequest`.

Every schema is a function ``record -> EditRequest``; :func:`detect_schema` picks one from the
keys of a record, and :func:`load_requests` reads a file, a list of dicts, a ``datasets``
object, the name of a known benchmark (``counterfact``, ``zsre``, ``wikibigedit``: a local copy
found through ``$LIT_EDIT_DATA``, else the Hugging Face Hub, see :mod:`lit_edit.data.registry`)
or (with network) any Hub dataset id. Supported schemas:

``counterfact``       original nested CounterFact (``requested_rewrite`` with ``{}`` prompts)
``counterfact_flat``  EasyEdit flat CounterFact (``prompt``, ``rephrase_prompt``, ``locality_prompt`` …)
``zsre``              MEND zsRE (``src``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``);
                      EasyEdit convention: ``target_new = alt``, ``ground_truth = answers[0]``
``wikibigedit``       WikiBigEdit-style flat records (``update``, ``ans``, ``rephrase``, ``loc``, ``loc_ans``,
                      optional ``personas``, ``mhop``/``mhop_ans`` as portability)
``lit_edit``          the canonical schema (:meth:`EditRequest.to_dict`)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from lit_edit.data import registry
from lit_edit.data.request import EditRequest, PromptAnswer, RecordError
from lit_edit.io import read_json_records

log = logging.getLogger(__name__)

__all__ = [
    "SCHEMAS",
    "detect_schema",
    "from_counterfact",
    "from_counterfact_flat",
    "from_lit_edit",
    "from_wikibigedit",
    "from_zsre",
    "load_requests",
    "save_requests",
]

Record = Mapping[str, Any]


def _field(rec: Record, rid: Any, name: str, kind: type = str) -> Any:
    if name not in rec or rec[name] is None:
        raise RecordError(rid, name, "is missing")
    value = rec[name]
    if kind is str and not isinstance(value, str):
        raise RecordError(rid, name, f"must be a string, got {type(value).__name__}")
    return value


def _str_list(rec: Record, rid: Any, name: str) -> tuple[str, ...]:
    """A field that may be a string or a list of strings (absent → empty)."""
    value = rec.get(name)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RecordError(rid, name, "must be a string or a list of strings")


def _first(value: Any, rid: Any, name: str) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            raise RecordError(rid, name, "is an empty list")
        value = value[0]
    if not isinstance(value, str):
        raise RecordError(rid, name, f"must be a string, got {type(value).__name__}")
    return value


def _str_field(d: Mapping, rid: Any, name: str) -> str:
    """``d[name]`` or ``d[name]["str"]`` (CounterFact wraps targets as ``{"str": ..., "id": ...}``)."""
    if name not in d or d[name] is None:
        raise RecordError(rid, name, "is missing")
    v = d[name]
    if isinstance(v, Mapping):
        if "str" not in v:
            raise RecordError(rid, f"{name}.str", "is missing")
        v = v["str"]
    if not isinstance(v, str):
        raise RecordError(rid, name, f"must be a string, got {type(v).__name__}")
    return v


def from_counterfact(rec: Record, index: int) -> EditRequest:
    rid = rec.get("case_id", index)
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, Mapping):
        raise RecordError(rid, "requested_rewrite", "is missing or not an object")
    template = _str_field(rw, rid, "prompt")
    subject = _str_field(rw, rid, "subject")
    if "{}" not in template:
        raise RecordError(rid, "requested_rewrite.prompt", f"has no '{{}}' placeholder for the subject: {template!r}")
    try:
        prompt = template.format(subject)
    except (IndexError, KeyError, ValueError) as e:
        raise RecordError(rid, "requested_rewrite.prompt", f"needs exactly one '{{}}' placeholder ({e}): {template!r}") from None
    true_answer = _str_field(rw, rid, "target_true")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_str_field(rw, rid, "target_new"),
        ground_truth=true_answer,
        paraphrase_prompts=_str_list(rec, rid, "paraphrase_prompts"),
        # Neighborhood prompts are about other subjects whose true answer is target_true.
        locality=tuple(PromptAnswer(p, true_answer) for p in _str_list(rec, rid, "neighborhood_prompts")),
        case_id=rid,
    )


def from_counterfact_flat(rec: Record, index: int) -> EditRequest:
    rid = rec.get("case_id", index)
    loc_prompts = _str_list(rec, rid, "locality_prompt")
    loc_answers = _str_list(rec, rid, "locality_ground_truth")
    if len(loc_prompts) != len(loc_answers):
        raise RecordError(rid, "locality_ground_truth", f"has {len(loc_answers)} answers for {len(loc_prompts)} prompts")
    return EditRequest(
        prompt=_field(rec, rid, "prompt"),
        subject=_field(rec, rid, "subject"),
        target_new=_first(_field(rec, rid, "target_new", object), rid, "target_new"),
        ground_truth=_first(rec["ground_truth"], rid, "ground_truth") if rec.get("ground_truth") is not None else None,
        paraphrase_prompts=_str_list(rec, rid, "rephrase_prompt"),
        locality=tuple(PromptAnswer(p, a) for p, a in zip(loc_prompts, loc_answers)),
        case_id=rid,
    )


def from_zsre(rec: Record, index: int) -> EditRequest:
    rid = rec.get("case_id", index)
    answers = rec.get("answers") or rec.get("pred")
    loc = rec.get("loc")
    locality: tuple[PromptAnswer, ...] = ()
    if loc:
        if not isinstance(loc, str):
            raise RecordError(rid, "loc", "must be a string")
        locality = (PromptAnswer(loc, _first(_field(rec, rid, "loc_ans", object), rid, "loc_ans")),)
    return EditRequest(
        prompt=_field(rec, rid, "src"),
        subject=_field(rec, rid, "subject"),
        target_new=_first(_field(rec, rid, "alt", object), rid, "alt"),
        ground_truth=_first(answers, rid, "answers") if answers else None,
        paraphrase_prompts=_str_list(rec, rid, "rephrase"),
        locality=locality,
        case_id=rid,
    )


def from_wikibigedit(rec: Record, index: int) -> EditRequest:
    rid = rec.get("case_id", rec.get("id", index))
    paraphrases = _str_list(rec, rid, "rephrase") + _str_list(rec, rid, "personas")
    loc = _str_list(rec, rid, "loc")
    loc_ans = _str_list(rec, rid, "loc_ans")
    if len(loc) != len(loc_ans):
        raise RecordError(rid, "loc_ans", f"has {len(loc_ans)} answers for {len(loc)} prompts")
    mhop, mhop_ans = _str_list(rec, rid, "mhop"), _str_list(rec, rid, "mhop_ans")
    if len(mhop) != len(mhop_ans):
        raise RecordError(rid, "mhop_ans", f"has {len(mhop_ans)} answers for {len(mhop)} prompts")
    return EditRequest(
        prompt=_field(rec, rid, "update"),
        subject=rec.get("subject"),
        target_new=_first(_field(rec, rid, "ans", object), rid, "ans"),
        ground_truth=None,
        paraphrase_prompts=paraphrases,
        locality=tuple(PromptAnswer(p, a) for p, a in zip(loc, loc_ans)),
        portability=tuple(PromptAnswer(p, a) for p, a in zip(mhop, mhop_ans)),
        case_id=rid,
    )


def from_lit_edit(rec: Record, index: int) -> EditRequest:
    rid = rec.get("case_id", index)
    for name in ("prompt", "target_new"):
        _field(rec, rid, name)
    try:
        req = EditRequest.from_dict(dict(rec))
    except TypeError as e:  # a malformed nested locality/portability entry
        raise RecordError(rid, "locality/portability", f"entries need 'prompt' and 'answer' ({e})") from None
    return req if req.case_id is not None else EditRequest.from_dict({**rec, "case_id": index})


SCHEMAS: dict[str, Callable[[Record, int], EditRequest]] = {
    "counterfact": from_counterfact,
    "counterfact_flat": from_counterfact_flat,
    "zsre": from_zsre,
    "wikibigedit": from_wikibigedit,
    "lit_edit": from_lit_edit,
}


def detect_schema(rec: Record) -> str:
    """Name of the schema a record is in, from its keys."""
    if not isinstance(rec, Mapping):
        raise RecordError(0, "<record>", f"must be a JSON object, got {type(rec).__name__}")
    keys = set(rec)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"update", "ans"} <= keys:
        return "wikibigedit"
    if {"prompt", "target_new"} <= keys:
        if keys & {"rephrase_prompt", "locality_prompt", "locality_ground_truth"}:
            return "counterfact_flat"
        return "lit_edit"
    raise ValueError(
        f"cannot tell the schema of a record with keys {sorted(keys)}; "
        f"pass schema= one of {sorted(SCHEMAS)}"
    )


def _read_file(path: Path) -> list[Any]:
    data = read_json_records(path)
    if isinstance(data, Mapping):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise ValueError(f"{path}: expected a JSON list of records")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _records(source: Any, split: Optional[str]) -> tuple[list[Any], Optional[registry.KnownDataset], Optional[str]]:
    """The raw records of ``source``, the known data set it names (if any) and its Hub schema (if from the Hub)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.exists():
            if path.suffix not in (".json", ".jsonl"):
                raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .json or .jsonl)")
            return _read_file(path), None, None
        known = registry.known_dataset(source)
        if known is not None:
            local = registry.find_local(known)
            if local is not None:
                log.info("data set %r: reading the local copy %s", known.name, local)
                return _read_file(local), known, None
            return registry.load_from_hub(known, split), known, known.schema
        looks_like_file = path.suffix in (".json", ".jsonl")
        if isinstance(source, str) and "/" in source and not source.startswith((".", "/")) and not looks_like_file:
            import datasets  # a hub dataset name: needs network

            return list(datasets.load_dataset(source, split=split or "train")), None, None
        if isinstance(source, str) and not looks_like_file and "/" not in source and "\\" not in source:
            raise FileNotFoundError(registry.unknown_source_message(source))
        raise FileNotFoundError(f"data source {str(source)!r} is neither an existing file nor a dataset name")
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            source = source[split or "train"]
        if isinstance(source, datasets.Dataset):
            return list(source), None, None
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, Iterable) and not isinstance(source, Mapping):
        return list(source), None, None
    raise TypeError(f"cannot read edit requests from {type(source).__name__}")


def load_requests(
    source: Any,
    schema: Optional[str] = None,
    limit: Optional[int] = None,
    offset: int = 0,
    split: Optional[str] = None,
    require_subject: bool = False,
    skip_invalid: bool = False,
) -> list[EditRequest]:
    """Read and validate edit requests.

    Args:
        source: a ``.json``/``.jsonl`` path, a list of dicts or ``EditRequest``s, a
            ``datasets.Dataset``/``DatasetDict``, the name of a known benchmark
            (``counterfact``, ``zsre``, ``wikibigedit``: a local copy in ``$LIT_EDIT_DATA`` or
            ``<cache root>/data``, else the Hub; see :mod:`lit_edit.data.registry`), or a Hub
            dataset id (network needed).
        schema: one of :data:`SCHEMAS`; auto-detected from the first record when ``None``
            (a known benchmark's Hub copy is read in its own schema).
        limit: keep at most this many records (after ``offset``).
        split: split of a ``DatasetDict`` or Hub dataset (default ``train``; a known
            benchmark's own split for its Hub copy).
        require_subject: fail on records without a subject (locate-and-edit editors).
        skip_invalid: drop (and log) records that raise :class:`RecordError` instead of failing;
            the public MEND zsRE file, for one, holds a few records with an empty ``alt``.
            ``limit``/``offset`` select records before any are dropped.
    """
    if schema is not None and schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
    records, known, hub_schema = _records(source, split)
    check_family = known is not None and schema is None and hub_schema is None  # a local copy, auto-detected
    schema = schema or hub_schema
    total = len(records)
    records = records[offset:] if limit is None else records[offset : offset + limit]
    if not records:
        where = repr(source) if isinstance(source, (str, Path)) else f"the given {type(source).__name__}"
        raise ValueError(f"no edit requests in {where} ({total} records; offset={offset}, limit={limit})")
    out: list[EditRequest] = []
    skipped: list[str] = []
    convert = None
    for i, rec in enumerate(records, start=offset):
        try:
            if isinstance(rec, EditRequest):
                out.append(rec.validate(require_subject))
                continue
            if not isinstance(rec, Mapping):
                raise RecordError(i, "<record>", f"must be a JSON object, got {type(rec).__name__}")
            if convert is None:
                name = schema or detect_schema(rec)
                if check_family and name not in known.schemas:
                    raise ValueError(
                        f"the local copy of data set {known.name!r} holds records of schema {name!r}, "
                        f"expected one of {list(known.schemas)}; pass schema= to read it anyway"
                    )
                log.info("reading edit requests as schema %r", name)
                convert = SCHEMAS[name]
            out.append(convert(rec, i).validate(require_subject))
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    if skipped:
        log.warning("skipped %d invalid records, e.g. %s", len(skipped), "; ".join(skipped[:3]))
    if not out:
        raise ValueError(f"no valid edit requests in {source!r} ({len(skipped)} invalid records skipped)")
    return out


def save_requests(requests: Iterable[EditRequest], path: Union[str, Path]) -> None:
    """Write requests as JSON in the canonical ``lit_edit`` schema."""
    Path(path).write_text(json.dumps([r.to_dict() for r in requests], indent=1, ensure_ascii=False))
