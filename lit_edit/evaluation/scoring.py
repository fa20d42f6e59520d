"""Scoring primitives: teacher-forced likelihoods, greedy generation, perplexity, fluency.

Every function takes a Hugging Face causal LM and its tokenizer, runs batched under
``torch.no_grad()`` on the model's device with the model in eval mode (its previous mode is
restored afterwards), and returns CPU tensors or Python values. Prompt/target pairs are
tokenized by :func:`lit_edit.data.tokenize.encode_pairs` (the target after a leading space),
exactly as the fine-tuning losses see them.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from lit_edit.data.tokenize import IGNORE_INDEX, encode_left_padded, encode_pairs, pad_rows, shift_for_loss, target_nll
from lit_edit.models import eval_mode, model_device

__all__ = [
    "STOP_STRINGS",
    "StopOnStrings",
    "continuation_nll",
    "greedy_generate",
    "ngram_entropy",
    "normalize_answer",
    "perplexity",
    "score_pairs",
    "teacher_forced_argmax",
    "text_nll",
    "truncate_at_stop",
]

STOP_STRINGS: tuple[str, ...] = (".", "\n")
"""Generation exact match stops a continuation at the first of these (or at EOS)."""


def _batches(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, total=math.ceil(n / batch_size), leave=False, disable=None)
    for start in starts:
        yield start, min(start + batch_size, n)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------- teacher forcing


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
    with_argmax: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One teacher-forced pass over (prompt, target) pairs.

    Returns the mean token NLL of each target (shape ``(N,)``, float32, CPU) and, when
    ``with_argmax``, for each pair the argmax token ids at the target positions and the target
    ids (both 1-D ``long`` tensors of the target's length); otherwise an empty list.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    device = model_device(model)
    nlls: list[torch.Tensor] = []
    tokens: list[tuple[torch.Tensor, torch.Tensor]] = []
    with eval_mode(model):
        for lo, hi in _batches(len(prompts), batch_size, progress, "teacher forcing"):
            batch = encode_pairs(tokenizer, prompts[lo:hi], targets[lo:hi])
            logits = _logits(model, batch, device)
            labels = batch["labels"].to(device)
            nlls.append(target_nll(logits, labels).float().cpu())
            if with_argmax:
                lg, lb = shift_for_loss(logits, labels)
                pred = lg.argmax(-1)
                mask = lb != IGNORE_INDEX
                for row in range(lb.shape[0]):
                    tokens.append((pred[row][mask[row]].cpu(), lb[row][mask[row]].cpu()))
    nll = torch.cat(nlls) if nlls else torch.zeros(0)
    return nll, tokens


def continuation_nll(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Mean token NLL of each continuation after its prompt, shape ``(N,)``.

    ``P(continuation | prompt) = exp(-nll)`` is the CounterFact probability (a geometric mean
    over the continuation's tokens).
    """
    return score_pairs(model, tokenizer, prompts, continuations, batch_size, with_argmax=False, progress=progress)[0]


def teacher_forced_argmax(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each pair, ``(argmax ids, target ids)`` at the target positions under teacher forcing."""
    return score_pairs(model, tokenizer, prompts, targets, batch_size, with_argmax=True, progress=progress)[1]


# --------------------------------------------------------------------------- generation


def truncate_at_stop(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to (excluding) the first occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Generation stopping criterion: a sequence is done once its new text contains a stop string.

    ``prompt_width`` is the (left-padded) prompt length: only the tokens after it are decoded.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, stop_strings: Sequence[str] = STOP_STRINGS):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop_strings = tuple(stop_strings)

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :].tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_strings: Sequence[str] = STOP_STRINGS,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches, pad = EOS).

    A sequence stops at EOS, after ``max_new_tokens``, or once its new text contains one of
    ``stop_strings``; the decoded continuation is truncated before the first stop string
    (so ``" Paris. It is"`` gives ``" Paris"``). Pass ``stop_strings=()`` for free-running
    text (fluency).
    """
    if not prompts:
        return []
    device = model_device(model)
    eos = [tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # e.g. Llama-3's <|eot_id|>
    for token in [model_eos] if isinstance(model_eos, int) else list(model_eos or []):
        if token not in eos:
            eos.append(token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    out: list[str] = []
    with eval_mode(model):
        for lo, hi in _batches(len(prompts), batch_size, progress, "generating"):
            batch = encode_left_padded(tokenizer, prompts[lo:hi])
            width = batch["input_ids"].shape[1]
            kwargs: dict[str, Any] = {}
            if stop_strings:
                kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, width, stop_strings)])
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
                **kwargs,
            )
            texts = tokenizer.batch_decode(generated[:, width:].tolist(), skip_special_tokens=True)
            out.extend(truncate_at_stop(t, stop_strings) if stop_strings else t for t in texts)
    return out


# --------------------------------------------------------------------------- text scores


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, remove the articles a/an/the and squeeze whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@torch.no_grad()
def text_nll(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    max_batch_tokens: int = 2048,
) -> tuple[float, int]:
    """Summed next-token NLL over every predicted token of ``texts`` and the number of tokens.

    Each text is tokenized with the tokenizer's special tokens and truncated to
    ``max_length`` tokens; its first token is context only. Texts are batched by length, at
    most ``batch_size`` per forward and (beyond the first) at most ``max_batch_tokens``
    padded tokens, which bounds the memory of the vocabulary-sized logits.
    """
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    rows = sorted((r for r in rows if len(r) >= 2), key=len)  # less padding per batch
    groups: list[list[list[int]]] = []
    for r in rows:  # sorted ascending: the newest row is the widest of its group
        if groups and len(groups[-1]) < batch_size and (len(groups[-1]) + 1) * len(r) <= max_batch_tokens:
            groups[-1].append(r)
        else:
            groups.append([r])
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with eval_mode(model):
        for index, _ in _batches(len(groups), 1, progress, "perplexity"):
            chunk = groups[index]
            ids, mask = pad_rows(chunk, pad)
            logits = _logits(model, {"input_ids": ids, "attention_mask": mask}, device)
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX).to(device)
            lg, lb = shift_for_loss(logits, labels)
            keep = lb != IGNORE_INDEX
            nll = torch.nn.functional.cross_entropy(lg[keep].float(), lb[keep], reduction="sum")
            total += nll.double().cpu()
            count += int(keep.sum())
    return float(total), count


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    max_batch_tokens: int = 2048,
) -> float:
    """Token-weighted perplexity over ``texts``: ``exp(sum NLL / number of predicted tokens)``."""
    total, count = text_nll(model, tokenizer, texts, max_length, batch_size, progress, max_batch_tokens)
    if count == 0:
        raise ValueError("no text has two or more tokens; perplexity is undefined")
    return math.exp(total / count)


_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, scale: float = 100.0) -> float:
    """Fluency of one generated text: ``(2/3·H₂ + 4/3·H₃) / 2`` × ``scale``.

    ``H_n`` is the entropy in bits of the text's word n-gram frequency distribution (words and
    punctuation marks are tokens). The default ``scale`` of 100 gives the figure reported by
    ROME/MEMIT (an unedited GPT-2 XL scores about 626); repetitive text scores low.
    """
    words = _WORDS.findall(text)
    weighted = 0.0
    for n, weight in ((2, 2.0 / 3.0), (3, 4.0 / 3.0)):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        weighted += weight * entropy
    return weighted / 2.0 * scale
