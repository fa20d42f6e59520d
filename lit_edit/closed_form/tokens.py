"""Fact-token location and context templates.

Locate-and-edit methods read keys and write values at the *fact token*: the last token of the
subject inside the prompt. :func:`fact_token_index` finds it from the tokenizer's character
offsets (or, for tokenizers without offsets, by tokenizing the text up to the subject's end),
so it is exact whatever the tokenizer merges. Under a chat template
(:mod:`lit_edit.data.chat`) the context template and prompt form the user message, and the
subject's character offsets are shifted by the text the template writes before it.

Context templates are short texts sampled from the model itself and put in front of the prompt
(``"<text>. {}"``); keys are averaged over them. :class:`ContextTemplates` samples them once per
(model, seed, spec) and caches them on disk under ``cache_root()/templates/``, keyed by a
fingerprint of the model's weights (:func:`lit_edit.models.weights_fingerprint`), and on the
instance (never in module globals).
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lit_edit.data.chat import PromptFormat, prompt_format
from lit_edit.data.request import EditRequest, RecordError
from lit_edit.data.tokenize import encode_target
from lit_edit.io import atomic_write, cache_root
from lit_edit.models import model_identity, weights_fingerprint
from lit_edit.progress import Progress

log = logging.getLogger(__name__)

__all__ = [
    "TemplateSpec",
    "ROME_TEMPLATES",
    "MEMIT_TEMPLATES",
    "ContextTemplates",
    "EncodedPrompt",
    "encode_in_template",
    "stop_token_ids",
    "fact_token_index",
    "sample_templates",
    "subject_span",
    "subject_tokens",
]


# --------------------------------------------------------------------------- fact token


def subject_span(request: EditRequest, prompt: Optional[str] = None) -> tuple[int, int]:
    """Character span ``[start, end)`` of the subject's first occurrence in the prompt."""
    prompt = request.prompt if prompt is None else prompt
    subject = request.subject
    if not subject:
        raise RecordError(request.case_id, "subject", "is required to locate the fact token")
    start = prompt.find(subject)
    if start < 0:
        raise RecordError(request.case_id, "subject", f"{subject!r} does not occur in prompt {prompt!r}")
    return start, start + len(subject)


def subject_tokens(tokenizer: Any, request: EditRequest, fmt: Optional[PromptFormat] = None) -> tuple[int, int]:
    """Token range ``[first, last + 1)`` of the subject's first occurrence in ``request``'s prompt
    as the model reads it (:func:`lit_edit.data.tokenize.encode_prompt`: raw, or inside the chat
    template of ``fmt``, default the tokenizer's); ``last`` is the fact token. A
    :class:`~lit_edit.data.request.RecordError` when the subject is missing or not in the prompt."""
    fmt = prompt_format(tokenizer, fmt)
    start, end = subject_span(request)
    text = fmt.wrap(request.prompt)
    first = fact_token_index(tokenizer, text, fmt.offset + start + 1, add_special_tokens=fmt.add_special_tokens)
    last = fact_token_index(tokenizer, text, fmt.offset + end, add_special_tokens=fmt.add_special_tokens)
    return first, last + 1


def fact_token_index(
    tokenizer: Any, text: str, char_end: int, ids: Optional[list[int]] = None, add_special_tokens: bool = True
) -> int:
    """Index of the token holding character ``char_end - 1`` of ``text``, tokenized with the
    tokenizer's special tokens (``add_special_tokens=False``: as a chat template writes them).

    Uses offset mappings when the tokenizer provides them; otherwise tokenizes ``text[:char_end]``
    and takes its last token (the prefix rule of the reference implementations).
    """
    if char_end <= 0 or char_end > len(text):
        raise ValueError(f"character end {char_end} outside text of length {len(text)}")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        for i, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and s <= char_end - 1 < e:
                return i
    prefix = tokenizer(text[:char_end], add_special_tokens=add_special_tokens)["input_ids"]
    return len(prefix) - 1


def stop_token_ids(tokenizer: Any, target: str, stop: str, fmt: Optional[PromptFormat] = None) -> list[int]:
    """Token ids of ``stop`` as they follow ``target`` (the stop-aware v*/z target).

    ``"eos"`` is the tokenizer's EOS token. Any other string is tokenized after the target as
    the model would continue: ``" " + target + stop`` (under a chat template ``target + stop``)
    is tokenized and the ids after the target's own ids are taken; if the tokenizer merges
    across the boundary (the joint ids do not start with the target's ids) ``stop`` is
    tokenized on its own.
    """
    if not isinstance(stop, str) or not stop:
        raise ValueError(f"stop must be 'eos' or a non-empty string, got {stop!r}")
    if stop == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("stop='eos' but the tokenizer has no EOS token")
        return [int(tokenizer.eos_token_id)]
    fmt = prompt_format(tokenizer, fmt)
    target_ids = encode_target(tokenizer, target, fmt=fmt)
    joint = tokenizer(fmt.answer_text(target) + stop, add_special_tokens=False)["input_ids"]
    if joint[: len(target_ids)] == target_ids and len(joint) > len(target_ids):
        return list(joint[len(target_ids):])
    alone = tokenizer(stop, add_special_tokens=False)["input_ids"]
    if not alone:
        raise ValueError(f"stop {stop!r} tokenizes to nothing")
    return list(alone)


@dataclass
class EncodedPrompt:
    """Token ids of one (template, prompt[, target]) row and where its fact token and target sit."""

    ids: list[int]
    fact_index: int
    prompt_length: int
    target_ids: list[int] = field(default_factory=list)


def encode_in_template(
    tokenizer: Any,
    request: EditRequest,
    template: str = "{}",
    prompt: Optional[str] = None,
    with_target: bool = False,
    stop: Optional[str] = None,
    fmt: Optional[PromptFormat] = None,
) -> EncodedPrompt:
    """Tokenize ``template`` with the prompt in place of ``{}``; optionally append the target.

    With ``with_target`` the row is ``prompt ids + target ids[:-1]`` (teacher forcing: the
    logits at ``prompt_length - 1 + j`` predict target token ``j``). With ``stop`` (see
    :func:`stop_token_ids`) the stop tokens are part of the target: ``target_ids`` is the
    target's ids followed by them, and the row holds all of it but the last token.

    ``fmt`` (default: the tokenizer's, :func:`lit_edit.data.chat.prompt_format`) decides the
    text: under a chat template the filled-in context template is the user message, followed
    by the generation prompt, and the fact token is located in that whole text.
    """
    prompt = request.prompt if prompt is None else prompt
    if "{}" not in template:
        raise ValueError(f"context template {template!r} has no '{{}}' placeholder")
    fmt = prompt_format(tokenizer, fmt)
    prefix, _, suffix = template.partition("{}")
    text = fmt.wrap(prefix + prompt + suffix)
    start, end = subject_span(request, prompt)
    ids = tokenizer(text, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    fact = fact_token_index(tokenizer, text, fmt.offset + len(prefix) + end, add_special_tokens=fmt.add_special_tokens)
    target: list[int] = []
    plen = len(ids)
    if with_target:
        target = encode_target(tokenizer, request.target_new, fmt=fmt)
        if stop is not None:
            target = target + stop_token_ids(tokenizer, request.target_new, stop, fmt=fmt)
        ids = ids + target[:-1]
    return EncodedPrompt(ids=ids, fact_index=fact, prompt_length=plen, target_ids=target)


# --------------------------------------------------------------------------- context templates


@dataclass(frozen=True)
class TemplateSpec:
    """How to sample context templates.

    ``groups`` is a sequence of ``(length, count)``: ``count`` texts of ``length`` tokens each.
    ``starts`` are the words generation starts from (split evenly over each group's count);
    ``None`` starts from the BOS token (EOS when the tokenizer has none). The bare prompt
    ``"{}"`` is always group 0.
    """

    groups: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    starts: Optional[tuple[str, ...]] = None
    top_k: int = 5


#: ROME: 10 texts of 5 tokens and 10 of 10 tokens, from BOS.
ROME_TEMPLATES = TemplateSpec(groups=((5, 10), (10, 10)))
#: MEMIT: 5 texts of 10 tokens started by "The", "Therefore", "Because", "I", "You".
MEMIT_TEMPLATES = TemplateSpec(groups=((10, 5),), starts=("The", "Therefore", "Because", "I", "You"))


def _clean_template(text: str) -> str:
    return text.replace("{", " ").replace("}", " ").strip() + ". {}"


def _template_groups_ok(groups: Any) -> bool:
    """Whether ``groups`` is a list of lists of templates, group 0 being ``["{}"]``."""
    return (
        isinstance(groups, list)
        and bool(groups)
        and groups[0] == ["{}"]
        and all(isinstance(g, list) and all(isinstance(t, str) and "{}" in t for t in g) for g in groups)
    )


class ContextTemplates:
    """Sampled context templates, cached per (model, seed, spec) on disk and on this object.

    On disk the key holds a fingerprint of the model's weights, so a different model (even one
    with the same name) never reuses another's templates; a file that cannot be read or does not
    hold template groups is resampled (one log line says why). On this object templates are kept
    per model object, seed and spec for the object's life: an editor samples them once, from the
    model as it was at its first edit, and keeps them while its edits change the weights.

    Args:
        cache_dir: where template files live (default ``cache_root()/templates``).
        use_disk: ``False`` disables the disk cache.
    """

    def __init__(self, cache_dir: Optional[Path] = None, use_disk: bool = True):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "templates"
        self.use_disk = use_disk
        self._memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:  # picklable (e.g. DDP spawn): the in-memory memo is not kept
        return {**self.__dict__, "_memo": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._memo = weakref.WeakKeyDictionary()

    @staticmethod
    def key(model: nn.Module, spec: TemplateSpec, seed: int) -> dict[str, Any]:
        """The disk-cache key: model name, :func:`~lit_edit.models.weights_fingerprint` of the
        whole model, seed and spec."""
        # normalised through JSON so a key read back from disk compares equal (tuples -> lists)
        return json.loads(json.dumps({
            "model": model_identity(model), "weights": weights_fingerprint(model), "seed": int(seed), "spec": asdict(spec),
        }))

    def get(self, model: nn.Module, tokenizer: Any, spec: TemplateSpec, seed: int = 0) -> list[list[str]]:
        """Template groups; group 0 is ``["{}"]`` (the bare prompt)."""
        memo = self._memo.setdefault(model, {})
        wanted = json.dumps({"seed": int(seed), "spec": asdict(spec)}, sort_keys=True)
        if wanted in memo:
            return memo[wanted]
        key = self.key(model, spec, seed)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        path = self.cache_dir / f"{digest}.json"
        if self.use_disk and path.exists():
            try:
                stored = json.loads(path.read_text())
                why = ("its key differs" if not isinstance(stored, dict) or stored.get("key") != key
                       else "" if _template_groups_ok(stored.get("templates")) else "it holds no template groups")
            except (OSError, ValueError) as exc:
                why = f"it cannot be read ({type(exc).__name__}: {exc})"
            if not why:
                log.info("reusing cached context templates %s", path)
                memo[wanted] = stored["templates"]
                return stored["templates"]
            log.warning("context template cache %s is unusable (%s); sampling again", path, why)
        groups = [["{}"]] + sample_templates(model, tokenizer, spec, seed)
        memo[wanted] = groups
        if self.use_disk:
            text = json.dumps({"key": key, "templates": groups}, indent=1, ensure_ascii=False)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
            log.info("sampled %d context templates, cached in %s", sum(map(len, groups)) - 1, path)
        return groups


@torch.no_grad()
def sample_templates(model: nn.Module, tokenizer: Any, spec: TemplateSpec, seed: int = 0) -> list[list[str]]:
    """Sample the template groups of ``spec`` from ``model`` (top-k sampling, seeded, RNG restored)."""
    device = next(model.parameters()).device
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), Progress(len(spec.groups), "context template groups", log) as bar:
        torch.manual_seed(seed)
        for length, count in spec.groups:
            group: list[str] = []
            starts = list(spec.starts) if spec.starts else [None]
            per_start = max(1, count // len(starts))
            for start in starts:
                ids = [start_id] if start is None else tokenizer(start, add_special_tokens=True)["input_ids"]
                inp = torch.tensor([ids], device=device)
                gen = model.generate(
                    input_ids=inp,
                    attention_mask=torch.ones_like(inp),
                    do_sample=True,
                    top_k=spec.top_k,
                    max_new_tokens=max(1, length - len(ids)),
                    num_return_sequences=per_start,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=None,
                    use_cache=True,
                )
                for row in gen:
                    keep = row if start is not None else row[len(ids):]
                    group.append(_clean_template(tokenizer.decode(keep, skip_special_tokens=True)))
            out.append(group)
            bar.update(1, templates=sum(map(len, out)))
    return out
