"""How prompts reach the model: as raw text, or inside the tokenizer's chat template.

``chat_template`` is one of

* ``never``: the prompt is tokenized as raw text (with the tokenizer's own special tokens) and
  the answer follows after a leading space (``"... city of" + " Rome"``);
* ``auto``: the prompt is the user turn of the tokenizer's chat template, followed by the
  template's generation prompt, and the answer is the assistant's reply, without a leading
  space; a tokenizer without a template is fed raw text, as with ``never``;
* ``always``: as ``auto``, but a tokenizer without a chat template is an error.

The chosen format is a :class:`PromptFormat` kept on the tokenizer object
(:func:`use_chat_template`), so every path that tokenizes a prompt for a model (teacher-forced
scoring, generation, the fine-tuning losses, the closed-form editors' keys and v*/z rows) reads
the same format through :func:`prompt_format`; a tokenizer that was never given one is fed raw
text. The chat wrapping is rendered once per tokenizer with a placeholder user message
(``apply_chat_template(..., add_generation_prompt=True)``), split into the text before and after
the message; a prompt is then ``before + prompt + after``, tokenized without adding special
tokens (the template writes its own), which is what ``apply_chat_template`` gives for that
prompt. The template's own defaults are kept: SmolLM2's template inserts its default system
message when none is given, so the model sees what it sees in chat use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["CHAT_MODES", "PromptFormat", "check_chat_mode", "chat_format", "prompt_format", "use_chat_template"]

CHAT_MODES = ("auto", "never", "always")
"""The values of the ``chat_template`` option."""

_ATTRIBUTE = "_lit_edit_prompt_format"
_PLACEHOLDER = "\uE000lit-edit-user-message\uE001"


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is turned into the text the model reads, and how its answer follows.

    ``mode`` is the ``chat_template`` option that produced this format; ``chat`` whether the
    tokenizer's template is applied (``auto`` on a tokenizer without one is raw text).
    ``before`` and ``after`` surround the prompt under a chat template (empty otherwise).
    """

    mode: str = "never"
    chat: bool = False
    before: str = ""
    after: str = ""

    def wrap(self, prompt: str) -> str:
        """The text the model reads for ``prompt``."""
        return self.before + prompt + self.after if self.chat else prompt

    @property
    def offset(self) -> int:
        """Character offset of the prompt inside :meth:`wrap`'s text."""
        return len(self.before) if self.chat else 0

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (raw text) or the template wrote them (chat)."""
        return not self.chat

    def answer_text(self, answer: str) -> str:
        """The answer as it follows the prompt: after a space in raw text, as it is in a chat reply."""
        from lit_edit.data.request import with_space

        return answer if self.chat else with_space(answer)

    def describe(self) -> dict[str, Any]:
        """A JSON record of this format (for summaries and cache keys)."""
        out: dict[str, Any] = {"mode": self.mode, "applied": self.chat}
        if self.chat:
            out["before"], out["after"] = self.before, self.after
        return out

    def label(self) -> str:
        """One line for the evaluation descriptions."""
        if not self.chat:
            extra = " (the tokenizer has no chat template)" if self.mode == "auto" else ""
            return f"prompts fed as raw text, answers after a space (chat_template={self.mode}{extra})"
        return (f"prompts as the user turn of the tokenizer's chat template with its generation prompt, "
                f"answers as the assistant reply (chat_template={self.mode})")


RAW = PromptFormat()


def check_chat_mode(mode: Any) -> str:
    """``mode`` if it is a valid ``chat_template`` value, else a ``ValueError`` naming the option."""
    if not isinstance(mode, str) or mode not in CHAT_MODES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_MODES)}; got {mode!r}")
    return mode


def chat_format(tokenizer: Any, mode: str) -> PromptFormat:
    """The :class:`PromptFormat` of ``tokenizer`` under ``chat_template=mode`` (not attached).

    ``always`` on a tokenizer without a chat template, and a template that does not contain the
    user message verbatim exactly once, are ``ValueError`` naming the option.
    """
    mode = check_chat_mode(mode)
    if mode == "never":
        return RAW
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        if mode == "always":
            raise ValueError(
                f"chat_template='always' but the tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has no chat template: "
                "use chat_template='auto' (raw text for such tokenizers) or 'never', or give the tokenizer a template"
            )
        return PromptFormat(mode=mode, chat=False)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str) or text.count(_PLACEHOLDER) != 1:
        raise ValueError(
            f"chat_template={mode!r}: the tokenizer's chat template does not write the user message verbatim exactly "
            "once, so prompts cannot be placed in it; use chat_template='never'"
        )
    before, _, after = text.partition(_PLACEHOLDER)
    return PromptFormat(mode=mode, chat=True, before=before, after=after)


def use_chat_template(tokenizer: Any, mode: str) -> PromptFormat:
    """Resolve ``chat_template=mode`` for ``tokenizer`` and keep the result on it; returns it.

    Every lit_edit function that tokenizes prompts with this tokenizer follows it from then on.
    The format belongs to the tokenizer object: editors or evaluations sharing one tokenizer
    share its format.
    """
    fmt = chat_format(tokenizer, mode)
    setattr(tokenizer, _ATTRIBUTE, fmt)
    return fmt


def prompt_format(tokenizer: Any, fmt: Optional[PromptFormat] = None) -> PromptFormat:
    """``fmt`` if given, else the format kept on ``tokenizer`` (raw text when it has none)."""
    if fmt is not None:
        return fmt
    found = getattr(tokenizer, _ATTRIBUTE, None)
    return found if isinstance(found, PromptFormat) else RAW
