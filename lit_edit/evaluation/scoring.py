"""Scoring primitives: teacher-forced likelihoods, greedy generation, perplexity, fluency.

Every function takes a Hugging Face causal LM and its tokenizer, runs batched under
``torch.no_grad()`` on the model's device with the model in eval mode (its previous mode is
restored afterwards), and returns CPU tensors or Python values. Prompt/target pairs are
tokenized by :func:`lit_edit.data.tokenize.encode_pairs` (the target after a leading space),
exactly as the fine-tuning losses see them.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from lit_edit.data.tokenize import IGNORE_INDEX, encode_left_padded, encode_pairs, pad_rows, shift_for_loss, target_nll
from lit_edit.models import eval_mode, model_device

log = logging.getLogger(__name__)

__all__ = [
    "STOP_STRINGS",
    "StopOnStrings",
    "can_still_match",
    "continuation_nll",
    "greedy_generate",
    "ngram_entropy",
    "normalize_answer",
    "perplexity",
    "reference_greedy_generate",
    "reference_score_pairs",
    "score_and_generate",
    "score_pairs",
    "stop_token_table",
    "teacher_forced_argmax",
    "text_nll",
    "truncate_at_stop",
    "with_progress",
]

STOP_STRINGS: tuple[str, ...] = (".", "\n")
"""Generation exact match stops a continuation at the first of these (or at EOS)."""


def _batches(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if progress:
        starts = with_progress(starts, total=math.ceil(n / batch_size), desc=desc)
    for start in starts:
        yield start, min(start + batch_size, n)


def with_progress(iterable: Any, total: int, desc: str, every: float = 30.0) -> Iterator[Any]:
    """The items of ``iterable``, counted by :class:`lit_edit.progress.Progress`: a bar in a
    terminal, otherwise an ``INFO`` line of this module's logger at most every ``every``
    seconds (count, elapsed time, time per item) and a closing line."""
    from lit_edit.progress import Progress

    with Progress(total, desc, logger=log, interval=every) as progress:
        for item in iterable:
            yield item
            progress.update()


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
    max_batch_tokens: int = 4096,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One teacher-forced pass over (prompt, target) pairs.

    Returns the mean token NLL of each target (shape ``(N,)``, float32, CPU) and, when
    ``with_argmax``, for each pair the argmax token ids at the target positions and the target
    ids (both 1-D ``long`` tensors of the target's length); otherwise an empty list.

    Pairs are scored sorted by length (less padding), at most ``batch_size`` per forward and,
    beyond the first, at most ``max_batch_tokens`` padded tokens; results come back in the
    given order. For architectures :func:`lit_edit.models.arch_for` knows, the language-model
    head runs only at the positions that predict a target token.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    if not prompts:
        return torch.zeros(0), []
    device = model_device(model)
    encoded = encode_pairs(tokenizer, prompts, targets)
    lengths = encoded["attention_mask"].sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = _length_groups(order, lengths, batch_size, max_batch_tokens)
    head = _head_module(model)
    nll = torch.zeros(len(prompts), dtype=torch.float32)
    tokens: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(prompts) if with_argmax else []
    with eval_mode(model):
        for group in with_progress(groups, total=len(groups), desc="teacher forcing") if progress else groups:
            index = torch.tensor(group, dtype=torch.long)
            width = max(lengths[i] for i in group)
            ids = encoded["input_ids"][index, :width].to(device)
            mask = encoded["attention_mask"][index, :width].to(device)
            labels = encoded["labels"][index, :width].to(device)
            keep = labels[:, 1:] != IGNORE_INDEX  # the logits at t predict the label at t + 1
            rows = keep.nonzero(as_tuple=True)[0]
            logits = _logits_at(model, head, ids, mask, keep)  # (number of target tokens, vocab)
            gold = labels[:, 1:][keep]
            per_token = torch.nn.functional.cross_entropy(logits.float(), gold, reduction="none")
            total = torch.zeros(len(group), dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
            nll[index] = (total / keep.sum(1).clamp_min(1)).float().cpu()
            if with_argmax:
                pred = logits.argmax(-1).cpu()
                counts = keep.sum(1).tolist()
                for row, pred_row, gold_row in zip(group, pred.split(counts), gold.cpu().split(counts)):
                    tokens[row] = (pred_row, gold_row)
    return nll, tokens  # type: ignore[return-value]


def _length_groups(order: Sequence[int], lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """``order`` (indices sorted by ascending length) cut into batches of at most ``batch_size``
    rows and, beyond the first row, ``max_batch_tokens`` padded tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: list[list[int]] = []
    for i in order:  # ascending: the newest row is the widest of its group
        if groups and len(groups[-1]) < batch_size and (len(groups[-1]) + 1) * lengths[i] <= max_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _head_module(model: nn.Module) -> Optional[nn.Module]:
    """The model's language-model head when its architecture is known (else ``None``: full logits)."""
    from lit_edit.models import arch_for

    try:
        return model.get_submodule(arch_for(model).lm_head)
    except (ValueError, AttributeError):
        return None


def _logits_at(model: nn.Module, head: Optional[nn.Module], ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The logits at the positions where ``keep`` (``(B, T-1)``) is true, ``(keep.sum(), vocab)``.

    With a known ``head`` it sees only those positions' hidden states (a forward pre-hook
    gathers them), so the vocabulary-sized product runs for the kept positions alone; any
    processing of the logits after the head is the model's own.
    """
    if head is None:
        return _logits(model, {"input_ids": ids, "attention_mask": mask}, ids.device)[:, :-1][keep]

    def gather(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[:, :-1][keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = _logits(model, {"input_ids": ids, "attention_mask": mask}, ids.device)
    finally:
        handle.remove()
    return logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def reference_score_pairs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
    with_argmax: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`score_pairs` computed plainly: batches in the given order, full logits at every
    position. The reference the fast path is checked against; returns the mean token NLL of each target (shape ``(N,)``, float32, CPU) and, when
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


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    eos = [tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # e.g. Llama-3's <|eot_id|>
    for token in [model_eos] if isinstance(model_eos, int) else list(model_eos or []):
        if token not in eos:
            eos.append(token)
    return eos


_STOP_TABLES: dict[tuple[Any, ...], torch.Tensor] = {}


def stop_token_table(tokenizer: Any, stop_strings: Sequence[str] = STOP_STRINGS, vocab_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """A boolean table over token ids: ``True`` where the token's own text (special tokens
    skipped) contains one of ``stop_strings``; ``None`` when a stop string is longer than one
    character (its pieces may span tokens; generation then decodes the new text at each step).

    A single character is in a sequence's decoded text exactly when it is in one of its
    tokens' texts, so a sequence meets a stop string at the first token flagged here.
    """
    stops = tuple(stop_strings)
    if any(len(stop) != 1 for stop in stops):
        return None
    size = max(len(tokenizer), vocab_size or 0)
    key = (id(tokenizer), type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), size, stops)
    table = _STOP_TABLES.get(key)
    if table is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        table = torch.zeros(size, dtype=torch.bool)
        table[: len(texts)] = torch.tensor([any(stop in text for stop in stops) for text in texts], dtype=torch.bool)
        _STOP_TABLES[key] = table
    return table


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
    """Greedy continuations of each prompt.

    A sequence stops at EOS, after ``max_new_tokens``, or once its new text contains one of
    ``stop_strings``; the decoded continuation is truncated before the first stop string
    (so ``" Paris. It is"`` gives ``" Paris"``). Pass ``stop_strings=()`` for free-running
    text (fluency).

    Prompts run sorted by length in left-padded batches of ``batch_size`` with a key/value
    cache; a sequence leaves its batch as soon as it stops (the stop test looks up the emitted
    token in :func:`stop_token_table`, no decoding per step), so the model computes only the
    tokens that are kept. Results come back in the given order. (This is
    :func:`score_and_generate` with no target to score.)
    """
    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(prompts)
    return score_and_generate(model, tokenizer, prompts, [()] * n, [True] * n, max_new_tokens, batch_size, stop_strings,
                              progress)[1]  # type: ignore[return-value]


def _stop_rule(model: nn.Module, tokenizer: Any, stops: tuple[str, ...], device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(done_ids, table)``: a boolean table over token ids, true at the model's EOS ids and at the
    tokens :func:`stop_token_table` flags (``table``; ``None`` when a stop string is longer than
    one character, and the stop test then decodes the new text)."""
    eos = _eos_ids(model, tokenizer)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    table = stop_token_table(tokenizer, stops, vocab) if stops else None
    done_ids = torch.zeros(max(len(tokenizer), vocab or 0, max(eos) + 1), dtype=torch.bool)
    done_ids[eos] = True
    if table is not None:
        done_ids[: len(table)] |= table
    return done_ids.to(device), table


def _cache_arg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """One pass over left-padded prompts: ``(logits at the last position (B, V), key/value cache,
    position ids (B, T))``; padding positions get position 0."""
    accepted = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return out.logits[:, -1], cache, positions


def _decode(
    model: nn.Module,
    tokenizer: Any,
    logits: torch.Tensor,
    cache: Any,
    mask: torch.Tensor,
    last: torch.Tensor,
    max_new_tokens: int,
    done_ids: torch.Tensor,
    decode_stops: tuple[str, ...],
    answers: Optional[Sequence[Optional[list[list[str]]]]] = None,
) -> list[list[int]]:
    """Greedy decoding from the last-position ``logits`` of a prefill and its ``cache``; ``last``
    holds each row's last position id. A row ends with (and includes) the token that stops it:
    one in ``done_ids``, or the one after which its decoded text holds one of ``decode_stops``,
    or the ``max_new_tokens``-th; a row that ended leaves the batch (its cache rows are
    dropped). With ``answers``, a row
    whose entry is a list of answers (as word lists of :func:`normalize_answer`) also ends as
    soon as no continuation of its text can equal one of them (:func:`can_still_match`)."""
    cache_arg = _cache_arg(model)
    live = list(range(logits.shape[0]))
    new: list[list[int]] = [[] for _ in live]
    for step in range(max_new_tokens):
        token = logits.float().argmax(-1)
        ended = done_ids[token]
        for row, t in zip(live, token.tolist()):
            new[row].append(t)
        if decode_stops:
            texts = tokenizer.batch_decode([new[row] for row in live], skip_special_tokens=True)
            ended = ended | torch.tensor([any(s in x for s in decode_stops) for x in texts], device=ended.device)
        if answers is not None:
            open_rows = [i for i, row in enumerate(live) if answers[row] is not None and not bool(ended[i])]
            if open_rows:
                texts = tokenizer.batch_decode([new[live[i]] for i in open_rows], skip_special_tokens=True)
                decided = [i for i, x in zip(open_rows, texts) if not can_still_match(x, answers[live[i]])]
                if decided:
                    ended = ended.clone()
                    ended[decided] = True
        if step + 1 == max_new_tokens or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero(as_tuple=True)[0]
            cache.batch_select_indices(keep)
            mask, last, token = mask[keep], last[keep], token[keep]
            live = [live[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True, **{cache_arg: cache})
        logits = out.logits[:, -1]
    return new


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain growing key/value cache (no sliding window,
    no quantisation), whose tensors a pass replaces rather than changes in place."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


@torch.no_grad()
def score_and_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[Sequence[str]],
    generate: Sequence[bool],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    stop_strings: Sequence[str] = STOP_STRINGS,
    progress: bool = False,
    answers: Optional[Sequence[Optional[Sequence[str]]]] = None,
) -> tuple[list[list[tuple[float, tuple[torch.Tensor, torch.Tensor]]]], list[Optional[str]]]:
    """Teacher-forced scores of each prompt's targets and, where ``generate``, its greedy
    continuation, from one pass over the prompt.

    Returns ``(scores, texts)``: ``scores[i][j] = (mean token NLL, (argmax ids, target ids))``
    of ``targets[i][j]`` after ``prompts[i]`` (as :func:`score_pairs` gives them), and
    ``texts[i]`` the continuation of ``prompts[i]`` (as :func:`greedy_generate` gives it) or
    ``None`` where ``generate[i]`` is false.

    Prompts run sorted by length in left-padded batches of ``batch_size``. Each batch is run
    once with a key/value cache: the logits at its last position score every target's first
    token and start the generation; the rest of each target runs on a copy of the cache rows of
    its prompt, and the generation continues from the cache itself. Where a target and a
    continuation share a prompt (CounterFact's edit, paraphrase and neighbourhood prompts are
    each scored with two targets and generated from), the prompt is computed once instead of
    three times. Generations equal :func:`greedy_generate`'s for the same batches; scores equal
    :func:`score_pairs`'s up to float rounding. A model whose cache is not a plain growing one
    (sliding window, quantised) scores its targets with :func:`score_pairs` instead.

    ``answers`` (optional, one entry per prompt): where an entry is a list of strings, only the
    exact match of that continuation with one of them is wanted, so its generation stops as
    soon as no continuation of it can equal any of them after :func:`normalize_answer`
    (:func:`can_still_match`); its text is then cut short, and its exact match with each of
    them is the same as the full continuation's. ``None`` entries (and ``answers=None``) run to
    a stop as usual. Used only with single-character stop strings (or none), where a cut-off
    text is a prefix of the full one.
    """
    if not (len(prompts) == len(targets) == len(generate)):
        raise ValueError(f"{len(prompts)} prompts, {len(targets)} target lists and {len(generate)} generate flags")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(answers)} answer lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from lit_edit.data.tokenize import encode_target

    scores: list[list[Any]] = [[None] * len(t) for t in targets]
    texts: list[Optional[str]] = [None] * len(prompts)
    if not prompts:
        return scores, texts
    device = model_device(model)
    stops = tuple(stop_strings)
    done_ids, table = _stop_rule(model, tokenizer, stops, device)
    if answers is not None and (table is not None or not stops):
        words = [None if a is None else [normalize_answer(x).split() for x in a] for a in answers]
    else:
        words = None
    target_ids = [[encode_target(tokenizer, t) for t in ts] for ts in targets]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    head = _head_module(model)
    cache_arg = _cache_arg(model)
    encoded = encode_left_padded(tokenizer, prompts)
    lengths = encoded["attention_mask"].sum(1).tolist()
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model):
        desc = "scoring and generating" if any(targets) else "generating"
        for group in with_progress(groups, total=len(groups), desc=desc) if progress else groups:
            width = max(lengths[i] for i in group)
            index = torch.tensor(group, dtype=torch.long)
            ids = encoded["input_ids"][index, -width:].to(device)
            mask = encoded["attention_mask"][index, -width:].to(device)
            logits, cache, positions = _prefill(model, ids, mask)
            pairs = [(b, j) for b, i in enumerate(group) for j in range(len(targets[i]))]
            if pairs and not _plain_dynamic_cache(cache):
                flat = [(group[b], j) for b, j in pairs]
                nll, tokens = score_pairs(model, tokenizer, [prompts[i] for i, _ in flat],
                                          [targets[i][j] for i, j in flat], batch_size)
                for k, (i, j) in enumerate(flat):
                    scores[i][j] = (float(nll[k]), tokens[k])
            elif pairs:
                _score_on_cache(model, head, cache, cache_arg, logits, mask, positions, group, pairs, target_ids, pad, scores)
            wanted = [b for b, i in enumerate(group) if generate[i]]
            if not wanted:
                continue
            if len(wanted) < len(group):
                keep = torch.tensor(wanted, device=device)
                cache.batch_select_indices(keep)
                logits, mask, positions = logits[keep], mask[keep], positions[keep]
            new = _decode(model, tokenizer, logits, cache, mask, positions[:, -1], max_new_tokens, done_ids,
                          stops if table is None else (), None if words is None else [words[group[b]] for b in wanted])
            for b, tokens_b in zip(wanted, new):
                text = tokenizer.decode(tokens_b, skip_special_tokens=True)
                texts[group[b]] = truncate_at_stop(text, stops) if stops else text
    return scores, texts


def _score_on_cache(model, head, cache, cache_arg, logits, mask, positions, group, pairs, target_ids, pad, scores) -> None:
    """Score ``pairs`` (``(row in the batch, target index)``) from a prefill's last-position
    ``logits`` and ``cache``; the cache's tensors are put back afterwards."""
    device = logits.device
    first = logits.float().log_softmax(-1)
    first_pred = logits.float().argmax(-1).tolist()
    rest = [(b, j) for b, j in pairs if len(target_ids[group[b]][j]) > 1]
    later: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    if rest:
        saved = [(layer.keys, layer.values) for layer in cache.layers]
        rows = torch.tensor([b for b, _ in rest], device=device)
        feeds = [target_ids[group[b]][j][:-1] for b, j in rest]  # the last target token predicts nothing
        span = max(map(len, feeds))
        tin, tmask = pad_rows(feeds, pad)
        tin, tmask = tin.to(device), tmask.to(device)
        try:
            cache.batch_select_indices(rows)
            keep = tmask.bool()
            hook = None
            if head is not None:
                hook = head.register_forward_pre_hook(lambda _m, args: (args[0][keep].unsqueeze(0), *args[1:]))
            try:
                out = model(
                    input_ids=tin, attention_mask=torch.cat([mask[rows], tmask], dim=1),
                    position_ids=positions[rows, -1:] + 1 + torch.arange(span, device=device), use_cache=True,
                    **{cache_arg: cache},
                )
            finally:
                if hook is not None:
                    hook.remove()
            flat = out.logits.reshape(-1, out.logits.shape[-1]) if head is not None else out.logits[keep]
        finally:
            for layer, (k, v) in zip(cache.layers, saved):
                layer.keys, layer.values = k, v
        flat = flat.float()
        counts = [len(f) for f in feeds]
        for (b, j), lg in zip(rest, flat.split(counts)):
            later[b, j] = (lg, torch.tensor(target_ids[group[b]][j][1:], device=device))
    for b, j in pairs:
        gold = target_ids[group[b]][j]
        nll = -first[b, gold[0]]
        pred = [first_pred[b]]
        if (b, j) in later:
            lg, g = later[b, j]
            nll = nll + torch.nn.functional.cross_entropy(lg, g, reduction="sum")
            pred += lg.argmax(-1).tolist()
        scores[group[b]][j] = (float(nll) / len(gold), (torch.tensor(pred), torch.tensor(gold)))


@torch.no_grad()
def reference_greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_strings: Sequence[str] = STOP_STRINGS,
    progress: bool = False,
) -> list[str]:
    """:func:`greedy_generate` computed plainly with ``model.generate`` and a stopping criterion
    that decodes every sequence at every step. The reference the fast path is checked against.

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


_ARTICLE_WORDS = ("a", "an", "the")


def can_still_match(text: str, answers: Sequence[Sequence[str]]) -> bool:
    """Whether some continuation of ``text`` (``text`` + more characters) can equal one of
    ``answers`` after :func:`normalize_answer`; each answer is given as its normalized word list
    (``normalize_answer(answer).split()``). Conservative: ``True`` whenever unsure.

    After lower-casing and removing punctuation, a word followed by whitespace is final: more
    text can neither change it nor drop it unless it is an article; the last word, if no space
    follows it, can only grow at its end. So the text can still match an answer when its final
    words (articles dropped) begin that answer and its last, open word (if any) begins the
    answer's next word or an article. Characters other than letters, digits, ``_`` and
    whitespace left after punctuation removal (where the article rule's word boundaries behave
    differently) make the answer ``True``.
    """
    q = text.lower().translate(_PUNCTUATION)
    if any(not (c.isalnum() or c == "_" or c.isspace()) for c in q):
        return True
    words = q.split()
    partial = words.pop() if q and not q[-1].isspace() and words else None
    final = [w for w in words if w not in _ARTICLE_WORDS]
    k = len(final)
    for answer in answers:
        if len(answer) < k or list(answer[:k]) != final:
            continue
        if partial is None or any(a.startswith(partial) for a in _ARTICLE_WORDS):
            return True
        if k < len(answer) and answer[k].startswith(partial):
            return True
    return False


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
