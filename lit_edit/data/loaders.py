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
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from lit_edit.data import registry
from lit_edit.data.request import EditRequest, PromptAnswer, RecordError, check_case_id, text_problem
from lit_edit.options import check_int, check_str

log = logging.getLogger(__name__)

__all__ = [
    "FIELD_NAMES",
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


def _text(value: Any, rid: Any, name: str) -> str:
    """``value`` if it is usable text (:func:`text_problem`), else a :class:`RecordError` naming ``name``."""
    problem = text_problem(value)
    if problem is not None:
        raise RecordError(rid, name, problem)
    return value


def _field(rec: Record, rid: Any, name: str, kind: type = str, display: Optional[str] = None) -> Any:
    """``rec[name]``, checked as text unless ``kind`` is ``object``; errors name ``display`` (default ``name``)."""
    display = display or name
    if not isinstance(rec, Mapping) or name not in rec or rec[name] is None:
        raise RecordError(rid, display, "is missing")
    value = rec[name]
    return _text(value, rid, display) if kind is str else value


def _optional_text(rec: Record, rid: Any, name: str) -> Optional[str]:
    """``rec[name]`` checked as text, or ``None`` when absent or null."""
    value = rec.get(name)
    return None if value is None else _text(value, rid, name)


def _str_list(rec: Record, rid: Any, name: str) -> tuple[str, ...]:
    """A field that may be a string or a list of strings (absent, null or ``""`` → empty)."""
    value = rec.get(name)
    if value is None or (isinstance(value, str) and value == ""):
        return ()
    if isinstance(value, str):
        return (_text(value, rid, name),)
    if isinstance(value, (list, tuple)):
        return tuple(_text(v, rid, f"{name}[{i}]") for i, v in enumerate(value))
    raise RecordError(rid, name, f"must be a string or a list of strings, got {type(value).__name__}")


def _first(value: Any, rid: Any, name: str) -> str:
    """``value``, or its first item when it is a list, checked as text."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise RecordError(rid, name, "is an empty list")
        return _text(value[0], rid, f"{name}[0]")
    return _text(value, rid, name)


def _str_field(d: Mapping, rid: Any, name: str, prefix: str = "") -> str:
    """``d[name]`` or ``d[name]["str"]`` (CounterFact wraps targets as ``{"str": ..., "id": ...}``)."""
    display = prefix + name
    if name not in d or d[name] is None:
        raise RecordError(rid, display, "is missing")
    v = d[name]
    if isinstance(v, Mapping):
        if v.get("str") is None:
            raise RecordError(rid, f"{display}.str", "is missing")
        return _text(v["str"], rid, f"{display}.str")
    return _text(v, rid, display)


def _pairs(rec: Record, rid: Any, prompts: str, answers: str) -> tuple[PromptAnswer, ...]:
    """(prompt, answer) pairs from two parallel string-or-list fields of equal length."""
    ps, ans = _str_list(rec, rid, prompts), _str_list(rec, rid, answers)
    if len(ps) != len(ans):
        raise RecordError(rid, answers, f"has {len(ans)} answers for {len(ps)} prompts")
    return tuple(PromptAnswer(p, a) for p, a in zip(ps, ans))


def _record_id(rec: Record, index: int, *names: str) -> Any:
    """The record's id (the first of ``names`` present and not null), else its position ``index``."""
    for name in names:
        if rec.get(name) is not None:
            return check_case_id(rec[name], index)
    return index


def from_counterfact(rec: Record, index: int) -> EditRequest:
    rid = _record_id(rec, index, "case_id")
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, Mapping):
        raise RecordError(rid, "requested_rewrite", "is missing or not an object")
    template = _str_field(rw, rid, "prompt", "requested_rewrite.")
    subject = _str_field(rw, rid, "subject", "requested_rewrite.")
    if "{}" not in template:
        raise RecordError(rid, "requested_rewrite.prompt", f"has no '{{}}' placeholder for the subject: {template[:200]!r}")
    rest = template.replace("{}", "", 1)
    if "{" in rest or "}" in rest:  # a second placeholder, or a format field ("{0}", "{x:>9}") that str.format would expand
        raise RecordError(rid, "requested_rewrite.prompt", f"needs exactly one '{{}}' placeholder and no other braces: {template[:200]!r}")
    prompt = template.replace("{}", subject, 1)
    true_answer = _str_field(rw, rid, "target_true", "requested_rewrite.")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_str_field(rw, rid, "target_new", "requested_rewrite."),
        ground_truth=true_answer,
        paraphrase_prompts=_str_list(rec, rid, "paraphrase_prompts"),
        # Neighborhood prompts are about other subjects whose true answer is target_true.
        locality=tuple(PromptAnswer(p, true_answer) for p in _str_list(rec, rid, "neighborhood_prompts")),
        case_id=rid,
    )


def from_counterfact_flat(rec: Record, index: int) -> EditRequest:
    rid = _record_id(rec, index, "case_id")
    locality = _pairs(rec, rid, "locality_prompt", "locality_ground_truth")
    return EditRequest(
        prompt=_field(rec, rid, "prompt"),
        subject=_field(rec, rid, "subject"),
        target_new=_first(_field(rec, rid, "target_new", object), rid, "target_new"),
        ground_truth=_first(rec["ground_truth"], rid, "ground_truth") if rec.get("ground_truth") is not None else None,
        paraphrase_prompts=_str_list(rec, rid, "rephrase_prompt"),
        locality=locality,
        case_id=rid,
    )


def from_zsre(rec: Record, index: int) -> EditRequest:
    rid = _record_id(rec, index, "case_id")
    answers_field = "answers" if rec.get("answers") else "pred"
    answers = rec.get(answers_field)
    loc = rec.get("loc")
    locality: tuple[PromptAnswer, ...] = ()
    if loc is not None and not (isinstance(loc, (str, list, tuple)) and len(loc) == 0):
        locality = (PromptAnswer(_text(loc, rid, "loc"), _first(_field(rec, rid, "loc_ans", object), rid, "loc_ans")),)
    return EditRequest(
        prompt=_field(rec, rid, "src"),
        subject=_field(rec, rid, "subject"),
        target_new=_first(_field(rec, rid, "alt", object), rid, "alt"),
        ground_truth=_first(answers, rid, answers_field) if answers else None,
        paraphrase_prompts=_str_list(rec, rid, "rephrase"),
        locality=locality,
        case_id=rid,
    )


def from_wikibigedit(rec: Record, index: int) -> EditRequest:
    rid = _record_id(rec, index, "case_id", "id")
    paraphrases = _str_list(rec, rid, "rephrase") + _str_list(rec, rid, "personas")
    return EditRequest(
        prompt=_field(rec, rid, "update"),
        subject=_optional_text(rec, rid, "subject"),
        target_new=_first(_field(rec, rid, "ans", object), rid, "ans"),
        ground_truth=None,
        paraphrase_prompts=paraphrases,
        locality=_pairs(rec, rid, "loc", "loc_ans"),
        portability=_pairs(rec, rid, "mhop", "mhop_ans"),
        case_id=rid,
    )


def _prompt_answers(rec: Record, rid: Any, name: str) -> tuple[PromptAnswer, ...]:
    """The canonical schema's ``locality`` / ``portability``: a list of ``{"prompt", "answer"}`` objects."""
    value = rec.get(name)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RecordError(rid, name, f"must be a list of {{'prompt': ..., 'answer': ...}} objects, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise RecordError(rid, f"{name}[{i}]", f"must be an object with 'prompt' and 'answer', got {type(item).__name__}")
        extra = sorted(str(k) for k in item if k not in ("prompt", "answer"))
        if extra:
            raise RecordError(rid, f"{name}[{i}]", f"has unknown keys {extra[:5]}; entries hold 'prompt' and 'answer'")
        out.append(PromptAnswer(_field(item, rid, "prompt", display=f"{name}[{i}].prompt"),
                                _field(item, rid, "answer", display=f"{name}[{i}].answer")))
    return tuple(out)


def from_lit_edit(rec: Record, index: int) -> EditRequest:
    rid = _record_id(rec, index, "case_id")
    return EditRequest(
        prompt=_field(rec, rid, "prompt"),
        target_new=_field(rec, rid, "target_new"),
        subject=_optional_text(rec, rid, "subject"),
        ground_truth=_optional_text(rec, rid, "ground_truth"),
        paraphrase_prompts=_str_list(rec, rid, "paraphrase_prompts"),
        locality=_prompt_answers(rec, rid, "locality"),
        portability=_prompt_answers(rec, rid, "portability"),
        case_id=rid,
    )


SCHEMAS: dict[str, Callable[[Record, int], EditRequest]] = {
    "counterfact": from_counterfact,
    "counterfact_flat": from_counterfact_flat,
    "zsre": from_zsre,
    "wikibigedit": from_wikibigedit,
    "lit_edit": from_lit_edit,
}


def _keys(rec: Record) -> str:
    keys = sorted(str(k) for k in rec)
    return repr(keys if len(keys) <= 12 else [*keys[:12], "..."])


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
    raise ValueError(f"cannot tell the schema of a record with keys {_keys(rec)}; pass schema= one of {sorted(SCHEMAS)}")


#: Keys a record may hold in both ``counterfact_flat`` and ``lit_edit``: such a record reads the same in either.
_SHARED_FLAT_KEYS = frozenset({"prompt", "target_new", "subject", "ground_truth", "case_id"})


def _ambiguous(rec: Record) -> bool:
    """A ``prompt``/``target_new`` record without the keys that tell the flat and the canonical schema apart."""
    return set(rec) <= _SHARED_FLAT_KEYS


def _where(path: Path, data: bytes, offset: int) -> str:
    """``path:line`` of a byte offset in a JSONL file, ``path`` (with the offset) otherwise."""
    if path.suffix.lower() == ".jsonl":
        line = data.count(b"\n", 0, offset) + 1
        return f"{path}:{line}"
    return f"{path} (byte {offset})"


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"{where}: not readable JSON (nested too deeply for Python's JSON reader)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{where}: not readable JSON ({e})") from None


def _read_file(path: Path) -> list[Any]:
    """The records of a ``.json`` file (a list, or an object holding one list) or a ``.jsonl`` file.

    The file must be UTF-8 (a byte-order mark is allowed); errors name the file and, for JSONL, the line.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{_where(path, data, e.start)}: not UTF-8 text (byte 0x{data[e.start]:02x} cannot be decoded); "
            "save the file as UTF-8"
        ) from None
    if path.suffix.lower() == ".jsonl":
        out = []
        # split on newlines only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise ValueError(f"{path}:{lineno}: not readable JSON (nested too deeply for Python's JSON reader)") from None
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not readable JSON ({e})") from None
        return out
    if not text.strip():
        raise ValueError(f"{path}: not valid JSON (the file is empty)")
    data = _parse(text, str(path))
    if isinstance(data, Mapping):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise ValueError(f"{path}: expected a JSON list of records, or an object holding exactly one list (it holds {len(lists)})")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _stat(path: Path, source: Any) -> Optional[os.stat_result]:
    """``os.stat`` of a data path, ``None`` when nothing is there; a path that cannot be a file is an error."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # a name too long, an embedded NUL byte, no permission ...
        raise ValueError(f"data path {_short(str(source))!r} cannot be read: {e}") from None


def _short(text: str, width: int = 200) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _records(source: Any, split: Optional[str]) -> tuple[list[Any], Optional[registry.KnownDataset], Optional[str]]:
    """The raw records of ``source``, the known data set it names (if any) and its Hub schema (if from the Hub)."""
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and not source.strip():
            raise ValueError(
                "data source is an empty string: pass a .json/.jsonl file, a data set name "
                f"({', '.join(registry.KNOWN_DATASETS)}), a Hub dataset id, or None / 'demo' for the demo set"
            )
        path = Path(source)
        st = _stat(path, source)
        if st is not None:
            if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block for ever, a directory fails obscurely
                raise ValueError(f"{path}: {_file_kind(st.st_mode)}, not a regular file; pass a .json or .jsonl file")
            if path.suffix.lower() not in (".json", ".jsonl"):
                raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .json or .jsonl)")
            return _read_file(path), None, None
        known = registry.known_dataset(source)
        if known is not None:
            local = registry.find_local(known)
            if local is not None:
                log.info("data set %r: reading the local copy %s", known.name, local)
                return _read_file(local), known, None
            return registry.load_from_hub(known, split), known, known.schema
        text = str(source)
        looks_like_file = path.suffix.lower() in (".json", ".jsonl")
        if isinstance(source, str) and "/" in text and not text.startswith((".", "/")) and not looks_like_file:
            import datasets  # a hub dataset name: needs network

            return list(datasets.load_dataset(source, split=split or "train")), None, None
        if isinstance(source, str) and not looks_like_file and "/" not in text and "\\" not in text:
            raise FileNotFoundError(registry.unknown_source_message(_short(text)))
        raise FileNotFoundError(f"data source {_short(text)!r} is neither an existing file nor a dataset name")
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            name = split or "train"
            if name not in source:
                raise ValueError(f"split {name!r} is not in the given DatasetDict; its splits: {sorted(source)}")
            source = source[name]
        if isinstance(source, datasets.Dataset):
            return list(source), None, None
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, Iterable) and not isinstance(source, (Mapping, bytes, bytearray)):
        return list(source), None, None
    raise TypeError(f"cannot read edit requests from {type(source).__name__}")


def _check_options(schema: Any, limit: Any, offset: Any, split: Any) -> None:
    if schema is not None and (not isinstance(schema, str) or schema not in SCHEMAS):
        raise ValueError(f"unknown schema {_short(repr(schema))}; known: {sorted(SCHEMAS)}")
    check_int("limit", limit, minimum=0, allow_none=True)
    check_int("offset", offset, minimum=0)
    check_str("split", split, allow_none=True)


def _compatible(first: str, name: str, rec: Record) -> bool:
    """Whether a record detected as ``name`` may share a file with records of schema ``first``."""
    if name == first:
        return True
    return {first, name} == {"counterfact_flat", "lit_edit"} and (name == "counterfact_flat" or _ambiguous(rec))


def _renamed(err: RecordError, schema: str) -> RecordError:
    """``err`` with an internal field name (``target_new``) replaced by the schema's own (``alt``)."""
    names = FIELD_NAMES.get(schema, {})
    base, sep, rest = err.field.partition("[")
    if base not in names:
        return err
    return RecordError(err.record, names[base] + sep + rest, err.problem)


#: Schema -> {EditRequest field: the field of the schema's records it comes from}, for errors.
FIELD_NAMES: dict[str, dict[str, str]] = {
    "counterfact": {
        "prompt": "requested_rewrite.prompt",
        "subject": "requested_rewrite.subject",
        "target_new": "requested_rewrite.target_new.str",
        "ground_truth": "requested_rewrite.target_true.str",
        "locality": "neighborhood_prompts",
    },
    "counterfact_flat": {"paraphrase_prompts": "rephrase_prompt", "locality": "locality_prompt"},
    "zsre": {"prompt": "src", "target_new": "alt", "ground_truth": "answers", "paraphrase_prompts": "rephrase", "locality": "loc"},
    "wikibigedit": {"prompt": "update", "target_new": "ans", "paraphrase_prompts": "rephrase", "locality": "loc", "portability": "mhop"},
    "lit_edit": {},
}


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
        source: a ``.json``/``.jsonl`` path (UTF-8, a byte-order mark allowed), a list of dicts
            or ``EditRequest``s, a ``datasets.Dataset``/``DatasetDict``, the name of a known
            benchmark (``counterfact``, ``zsre``, ``wikibigedit``: a local copy in
            ``$LIT_EDIT_DATA`` or ``<cache root>/data``, else the Hub; see
            :mod:`lit_edit.data.registry`), or a Hub dataset id (network needed).
        schema: one of :data:`SCHEMAS`, used for every record; detected from the records when
            ``None`` (a known benchmark's Hub copy is read in its own schema). Without
            ``skip_invalid`` every record must be in the schema of the first (a record in another
            one is an error naming it).
        limit: keep at most this many records (after ``offset``).
        offset: skip this many records first.
        split: split of a ``DatasetDict`` or Hub dataset (default ``train``; a known
            benchmark's own split for its Hub copy).
        require_subject: fail on records without a subject (locate-and-edit editors).
        skip_invalid: drop (and log, with the reasons and examples) records that raise
            :class:`RecordError` instead of failing, and read each record in the schema detected
            from its own keys; the public MEND zsRE file, for one, holds a few records with an
            empty ``alt``. ``limit``/``offset`` select records before any are dropped.

    Every record is checked (:meth:`EditRequest.validate`); errors are :class:`RecordError`\\ s
    naming the record (its ``case_id``, else its position) and the field as the source names it.
    Case ids must be unique strings or integers: a repeated id is an error naming both records.
    """
    _check_options(schema, limit, offset, split)
    records, known, hub_schema = _records(source, split)
    check_family = known is not None and schema is None and hub_schema is None  # a local copy, auto-detected
    schema = schema or hub_schema
    total = len(records)
    records = records[offset:] if limit is None else records[offset : offset + limit]
    where = repr(_short(str(source))) if isinstance(source, (str, os.PathLike)) else f"the given {type(source).__name__}"
    if not records:
        raise ValueError(f"no edit requests in {where} ({total} records; offset={offset}, limit={limit})")
    out: list[EditRequest] = []
    skipped: list[RecordError] = []
    first: Optional[tuple[str, int]] = None  # the schema of the first record detected, and its position
    counts: Counter = Counter()
    seen: dict[Any, int] = {}  # case id -> position of the record that has it
    for i, rec in enumerate(records, start=offset):
        try:
            if isinstance(rec, EditRequest):
                check_case_id(rec.case_id, i)
                req = rec.validate(require_subject)
            else:
                if not isinstance(rec, Mapping):
                    raise RecordError(i, "<record>", f"must be a JSON object, got {type(rec).__name__}")
                name = schema
                if name is None:
                    try:
                        name = detect_schema(rec)
                    except ValueError as e:
                        if first is None:
                            raise RecordError(_record_id(rec, i, "case_id"), "<record>", str(e)) from None
                        name = first[0]  # read in the file's schema: the error names the field the record lacks
                    if check_family and name not in known.schemas:
                        raise RecordError(
                            i, "<record>",
                            f"the local copy of data set {known.name!r} holds records of schema {name!r}, "
                            f"expected one of {list(known.schemas)}; pass schema= to read it anyway",
                        )
                    if first is None:
                        first = (name, i)
                        log.info("reading edit requests as schema %r", name)
                    elif not _compatible(first[0], name, rec):
                        if not skip_invalid:
                            raise RecordError(
                                i, "<record>",
                                f"is in schema {name!r} (keys {_keys(rec)}) but record {first[1]} is in schema {first[0]!r}; "
                                "a file holds one schema: split it, or pass skip_invalid=True to read each record in its own",
                            )
                    elif first[0] == "lit_edit" and name == "counterfact_flat":
                        first = (name, first[1])  # the records so far read the same in either
                    elif first[0] == "counterfact_flat" and name == "lit_edit":
                        name = "counterfact_flat"
                req = SCHEMAS[name](rec, i)
                try:
                    req.validate(require_subject)
                except RecordError as e:
                    raise _renamed(e, name) from None
                counts[name] += 1
            if req.case_id is not None:
                if req.case_id in seen:
                    raise RecordError(
                        i, "case_id",
                        f"{req.case_id!r} is also the case id of record {seen[req.case_id]} (records {seen[req.case_id]} and {i} "
                        "share it); every request needs its own id (a record without case_id takes its position)",
                    )
                seen[req.case_id] = i
            out.append(req)
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(e)
    if len(counts) > 1:
        log.warning("records of several schemas, each read in its own: %s", ", ".join(f"{n} {k}" for k, n in counts.items()))
    if skipped:
        why = Counter(e.field for e in skipped)
        log.warning(
            "skipped %d invalid records of %d (by field: %s), e.g. %s",
            len(skipped), len(records), ", ".join(f"{f!r} {n}" for f, n in why.most_common()),
            "; ".join(str(e) for e in skipped[:3]),
        )
    if not out:
        raise ValueError(
            f"no valid edit requests in {where} ({len(skipped)} invalid records skipped, e.g. {'; '.join(str(e) for e in skipped[:3])})"
        )
    return out


def save_requests(requests: Iterable[EditRequest], path: Union[str, Path]) -> None:
    """Write requests as JSON in the canonical ``lit_edit`` schema."""
    Path(path).write_text(json.dumps([r.to_dict() for r in requests], indent=1, ensure_ascii=False))
