"""The typed edit request every loader produces and every editor consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Union


class RecordError(ValueError):
    """A malformed input record; the message names the record and the field."""

    def __init__(self, record: Union[str, int, None], field_name: str, problem: str):
        self.record = record
        self.field = field_name
        super().__init__(f"record {record}: field {field_name!r}: {problem}")


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
        """Raise :class:`RecordError` naming the field if this request is malformed."""
        rid = self.case_id
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RecordError(rid, "prompt", "must be a non-empty string")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise RecordError(rid, "target_new", "must be a non-empty string")
        if self.ground_truth is not None and (not isinstance(self.ground_truth, str) or not self.ground_truth.strip()):
            raise RecordError(rid, "ground_truth", "must be a non-empty string when given")
        if self.subject is not None:
            if not isinstance(self.subject, str) or not self.subject.strip():
                raise RecordError(rid, "subject", "must be a non-empty string when given")
            if self.subject not in self.prompt:
                raise RecordError(rid, "subject", f"{self.subject!r} does not occur in prompt {self.prompt!r}")
        elif require_subject:
            raise RecordError(rid, "subject", "is required by this editor (keys are read at the subject)")
        for i, p in enumerate(self.paraphrase_prompts):
            if not isinstance(p, str) or not p.strip():
                raise RecordError(rid, f"paraphrase_prompts[{i}]", "must be a non-empty string")
        for kind in ("locality", "portability"):
            for i, pa in enumerate(getattr(self, kind)):
                if not isinstance(pa.prompt, str) or not pa.prompt.strip():
                    raise RecordError(rid, f"{kind}[{i}].prompt", "must be a non-empty string")
                if not isinstance(pa.answer, str) or not pa.answer.strip():
                    raise RecordError(rid, f"{kind}[{i}].answer", "must be a non-empty string")
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


__all__ = ["EditRequest", "PromptAnswer", "RecordError", "with_space"]
