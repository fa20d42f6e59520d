"""The typed edit request every loader produces and every editor consumes."""

from __future__ import annotations

import math
import numbers
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union


class RecordError(ValueError):
    """A malformed input record; the message names the record and the field.

    Attributes:
        record: the record's ``case_id``, or its position in the source when the id itself is bad.
        field: the field as the source names it (``alt`` for zsRE, ``requested_rewrite.target_new.str``
            for CounterFact, ``target_new`` for the canonical schema ...).
        problem: what is wrong, without the record and field.
    """

    def __init__(self, record: Any, field_name: str, problem: str):
        self.record = record
        self.field = field_name
        self.problem = problem
        super().__init__(f"record {_short(record)}: field {field_name!r}: {problem}")


def _short(value: Any, width: int = 80) -> str:
    """``repr``-like text of ``value`` (``str`` for ids), shortened to ``width`` characters."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


#: Characters that render as nothing, beyond the Unicode categories Cc, Cf, Zs, Zl and Zp:
#: Hangul fillers, the combining grapheme joiner, Mongolian and other variation selectors, the braille blank.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, *range(0x180B, 0x1810), *range(0xFE00, 0xFE10),
     *range(0xE0100, 0xE01F0)]
)


def _invisible(c: str) -> bool:
    return c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") or ord(c) in _INVISIBLE


def text_problem(value: Any) -> Optional[str]:
    """What makes ``value`` unusable as a prompt, target or subject, or ``None`` if it is fine.

    A usable text is a ``str`` of valid Unicode (no lone surrogate, which no tokenizer can
    encode) with at least one visible character (not only spaces, zero-width spaces, BOMs or
    other format characters).
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # only lone surrogates cannot be encoded
        return (
            f"contains a lone surrogate (U+{ord(value[e.start]):04X} at position {e.start}), which is not valid Unicode "
            "text (was the file written by an encoder that split a surrogate pair?)"
        )
    if not value.strip():
        return "must be a non-empty string"
    if all(_invisible(c) for c in value):
        codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in value if not c.isspace()}))
        return f"must contain visible text, got only invisible characters ({codes})"
    return None


def check_case_id(value: Any, record: Any) -> Union[int, str, None]:
    """``value`` if it is a usable case id (a string with visible text, an integer, or ``None``).

    Case ids key the depth-first editor's record of finished edits, which checkpoints keep, so an
    id must be hashable, equal to itself and stable through JSON: lists, floats (NaN above all)
    and booleans are refused. ``record`` names the record in the error (its position).
    """
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise RecordError(record, "case_id", problem)
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(record, "case_id", f"must be a string or an integer, got {value!r}, which never equals itself")
    raise RecordError(record, "case_id", f"must be a string or an integer, got {type(value).__name__} {_short(value)}")


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt with the answer it should keep (locality) or acquire (portability)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    ``prompt`` contains ``subject`` (locate-and-edit editors read keys at the subject's last
    token). ``target_new`` is what the edited model should say; ``ground_truth`` what it said
    before (optional: zsRE-style records may lack it). Targets are stored without the leading
    space that is added at tokenization time.
    """

    prompt: str
    target_new: str
    subject: Optional[str] = None
    ground_truth: Optional[str] = None
    paraphrase_prompts: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()
    case_id: Union[int, str, None] = None

    def validate(self, require_subject: bool = False) -> EditRequest:
        """Raise :class:`RecordError` naming the field if this request is malformed.

        Every text must be a string of valid Unicode with visible characters; the subject, when
        given (or required), must occur verbatim in the prompt; the case id must be a string or an
        integer (or ``None``).
        """
        check_case_id(self.case_id, _short(self.case_id))
        rid = self.case_id

        def text(value: Any, name: str) -> None:
            problem = text_problem(value)
            if problem is not None:
                raise RecordError(rid, name, problem)

        text(self.prompt, "prompt")
        text(self.target_new, "target_new")
        if self.ground_truth is not None:
            text(self.ground_truth, "ground_truth")
        if self.subject is not None:
            text(self.subject, "subject")
            if self.subject not in self.prompt:
                raise RecordError(rid, "subject", f"{_short(repr(self.subject))} does not occur in prompt {_short(repr(self.prompt))}")
        elif require_subject:
            raise RecordError(rid, "subject", "is required by this editor (keys are read at the subject)")
        if not isinstance(self.paraphrase_prompts, (tuple, list)):
            raise RecordError(rid, "paraphrase_prompts", f"must be a tuple of strings, got {type(self.paraphrase_prompts).__name__}")
        for i, p in enumerate(self.paraphrase_prompts):
            text(p, f"paraphrase_prompts[{i}]")
        for kind in ("locality", "portability"):
            pairs = getattr(self, kind)
            if not isinstance(pairs, (tuple, list)):
                raise RecordError(rid, kind, f"must be a tuple of PromptAnswer, got {type(pairs).__name__}")
            for i, pa in enumerate(pairs):
                if not isinstance(pa, PromptAnswer):
                    raise RecordError(rid, f"{kind}[{i}]", f"must be a PromptAnswer(prompt, answer), got {type(pa).__name__}")
                text(pa.prompt, f"{kind}[{i}].prompt")
                text(pa.answer, f"{kind}[{i}].answer")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict` (the canonical lit_edit schema)."""
        paraphrases = d.get("paraphrase_prompts") or ()
        if isinstance(paraphrases, str):  # one paraphrase given as a bare string
            paraphrases = (paraphrases,)
        return cls(
            prompt=d["prompt"],
            target_new=d["target_new"],
            subject=d.get("subject"),
            ground_truth=d.get("ground_truth"),
            paraphrase_prompts=tuple(paraphrases),
            locality=tuple(PromptAnswer(**x) for x in d.get("locality") or ()),
            portability=tuple(PromptAnswer(**x) for x in d.get("portability") or ()),
            case_id=d.get("case_id"),
        )


def with_space(text: str) -> str:
    """Targets are tokenized after a space (``" Paris"``), unless they already start with one."""
    return text if text[:1].isspace() else " " + text


__all__ = ["EditRequest", "PromptAnswer", "RecordError", "check_case_id", "text_problem", "with_space"]
