"""Relation-neighbour preservation: keep what the model says about OTHER subjects under an edited relation.

An edit request's prompt is a relation template filled with its subject ("The genre played by
{Sal Mosca} is"). Fine-tuning on the request can learn the relation instead of the fact: every
subject asked the same question starts to get the new answer. This term fills each request's
template with other subjects (``neighbour_prompts`` per request, drawn at random or the most similar
ones, or near-copies of the request's own subject, ``neighbour_choice``, from generic subjects:
the offline Wikipedia titles by default,
never the evaluation's locality prompts) and
penalises how far the edited model's next-token distributions on those prompts move from the
unedited model's:

    KL(p₀ ‖ p_θ)  at the last prompt position and at the next ``tokens − 1`` positions of the
    unedited model's own greedy continuation (teacher forced), and optionally (``on_target``)
    at every position of the request's new target teacher forced after the neighbour prompt,

averaged over the prompts of a mini-batch's requests. The unedited distributions are computed
once per request, without gradient, the first time a fit sees it, with the tuned tensors put
back to their originals for that pass. They are kept compactly: the unedited model's ``top``
most likely tokens and the mass of all others, and the KL is taken between the two
distributions coarsened to those ``top + 1`` outcomes (a lower bound of the full KL, zero
exactly when the coarsened distributions agree): ``requests × prompts × tokens × (top + 1)``
numbers instead of a vocabulary-sized row per position (``on_target`` adds the target's length
in positions per prompt).

:class:`NeighbourRise` holds, on the same prompts, only the new target's mean token
log-probability to the unedited model's (a hinge on its rise), and :class:`NeighbourKeys` the
tuned modules' outputs on the prompts' keys.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lit_edit.closed_form.hooks import StopForward, run_until_stopped
from lit_edit.closed_form.tokens import subject_tokens
from lit_edit.data.request import EditRequest
from lit_edit.data.tokenize import encode_prompt, encode_target, pad_rows
from lit_edit.losses import PreservationTerm, ft_loss, preservation_loss
from lit_edit.models import logits_at

__all__ = [
    "CHOICES",
    "NeighbourKeys",
    "NeighbourRise",
    "NeighbourTargets",
    "RelationNeighbours",
    "SubjectIndex",
    "build_targets",
    "check_subjects_source",
    "load_subjects",
    "neighbour_kl",
    "perturbed_subjects",
    "subject_words",
    "relation_prompts",
]

#: How the other subjects are chosen (:class:`RelationNeighbours`).
CHOICES = ("random", "similar", "perturbed")

#: Tokens of the unedited distribution kept exactly at each position; the rest is one outcome.
TOP_TOKENS = 256


def check_subjects_source(source: Any) -> None:
    """Refuse a ``neighbour_subjects`` value that names no usable source (before any loading)."""
    if isinstance(source, str):
        name, _, split = source.partition(":")
        if name == "wiki" and split in ("", "train", "heldout"):
            return
        path = Path(source).expanduser()
        if path.suffix.lower() == ".txt" and path.is_file():
            return
    raise ValueError(
        f"neighbour_subjects must be 'wiki:train', 'wiki:heldout' or an existing .txt file (one subject per line), got {source!r}"
    )


def load_subjects(source: str) -> list[str]:
    """Candidate subjects: ``wiki:train`` / ``wiki:heldout`` (offline Wikipedia titles of that split)
    or a local ``.txt`` file (one subject per non-empty line); a clear error otherwise."""
    check_subjects_source(source)
    name, _, split = source.partition(":")
    if name == "wiki":
        from lit_edit.data.corpus import wiki_titles

        subjects = wiki_titles(split or "train")
    else:
        path = Path(source).expanduser()
        subjects = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(subjects) < 2:
        raise ValueError(f"neighbour_subjects {source!r} holds {len(subjects)} subject(s); at least 2 are needed")
    return subjects


def _request_key(r: EditRequest) -> tuple:
    return (r.prompt, r.subject, r.target_new)


def _unseen(requests: Sequence[EditRequest], seen: Any) -> list[EditRequest]:
    """The requests of ``requests`` whose key is not in ``seen``, each once, in order."""
    new, out = set(), []
    for r in requests:
        key = _request_key(r)
        if key not in seen and key not in new:
            new.add(key)
            out.append(r)
    return out


def _same_entity(a: str, b: str) -> bool:
    """Whether one name contains the other (case-insensitive): "Apple" and "Apple Inc." name the
    same thing, and keeping the unedited answer for one would fight the edit of the other."""
    a, b = a.strip().lower(), b.strip().lower()
    return a in b or b in a


def subject_words(subjects: Sequence[str]) -> list[str]:
    """The distinct words (letters, digits, hyphens) of ``subjects``, sorted: the replacement words of
    :func:`perturbed_subjects`."""
    return sorted({w for other in subjects for w in other.split() if w.replace("-", "").isalnum()})


def perturbed_subjects(subject: str, words_pool: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` near-copies of ``subject``, each with one word swapped for a word of another subject.

    The swapped position cycles over the subject's words ("10 Crown Terrace" -> "Deal Crown
    Terrace", "10 Tower Terrace", "10 Crown Hill", ...), so every position of the name has a
    variant that differs only there. A one-word subject keeps its first half of characters and
    takes the second half of another word ("Sugeldi" -> "Sugmond"). The replacement words are
    drawn from ``words_pool`` (:func:`subject_words`; seeded by ``seed`` and the subject: the same
    subject always gets the same variants); a variant equal to, containing or contained in the
    subject is skipped."""
    words, pool = subject.split(), words_pool
    if not words or n < 1 or not pool:
        return []
    digest = hashlib.sha256(f"{seed}\0perturbed\0{subject}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    out: list[str] = []
    for attempt in range(20 * n):
        word = pool[rng.randrange(len(pool))]
        if len(words) == 1:
            keep = words[0][: (len(words[0]) + 1) // 2]
            variant = keep + word[len(word) // 2 :].lower()
        else:
            i = attempt % len(words)
            variant = " ".join(words[:i] + [word] + words[i + 1 :])
        if _same_entity(variant, subject) or variant in out:
            continue
        out.append(variant)
        if len(out) == n:
            break
    return out


def relation_prompts(
    request: EditRequest, subjects: Sequence[str], n: int, seed: int = 0, order: Optional[Sequence[int]] = None
) -> list[str]:
    """``request.prompt`` with its subject replaced by ``n`` other subjects (every occurrence).

    Without ``order`` the subjects are drawn from ``subjects`` by a generator seeded from
    ``seed`` and the request, so the same request always gets the same neighbours; with
    ``order`` (indices into ``subjects``, e.g. most similar first) they are taken in that order.
    A subject that contains the request's subject or is contained in it is never used. No
    prompts when the request has no subject or its prompt does not contain it."""
    subject = request.subject
    if not subject or subject not in request.prompt or n < 1:
        return []
    if order is None:
        digest = hashlib.sha256(f"{seed}\0{request.prompt}\0{subject}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        candidates = (rng.randrange(len(subjects)) for _ in range(10 * n + 10))
    else:
        candidates = iter(order)
    out: list[str] = []
    for i in candidates:
        other = subjects[i]
        if _same_entity(other, subject):
            continue
        prompt = request.prompt.replace(subject, other)
        if prompt not in out:
            out.append(prompt)
        if len(out) == n:
            break
    return out


class SubjectIndex:
    """Candidate subjects ranked by similarity to a given subject under a model's input embeddings:
    each name is the mean of its tokens' embeddings (tokenized after a space, as inside a prompt),
    compared by cosine similarity."""

    def __init__(self, model: nn.Module, tokenizer: Any, subjects: Sequence[str]):
        self.model, self.tokenizer = model, tokenizer
        self.vectors = torch.stack([self._vector(s) for s in subjects])

    @torch.no_grad()
    def _vector(self, name: str) -> torch.Tensor:
        table = self.model.get_input_embeddings().weight
        ids = self.tokenizer(" " + name.strip(), add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
        v = table[torch.tensor(ids, device=table.device)].float().mean(0)
        return (v / v.norm().clamp_min(1e-12)).cpu()

    def nearest(self, subject: str, k: int) -> list[int]:
        """Indices of the ``k`` candidates most similar to ``subject``, most similar first."""
        scores = self.vectors @ self._vector(subject)
        return scores.topk(min(k, len(scores))).indices.tolist()


@dataclass
class NeighbourTargets:
    """The unedited model's behaviour on one request's neighbour prompts.

    ``rows``: token ids per compared sequence (a prompt and its greedy continuation but its last
    token, or a prompt and the new target but its last token);
    ``positions``: per row, the positions whose next-token distribution is kept;
    ``top_ids`` / ``top_logp``: ``(positions, top)`` ids and log-probabilities of the most likely
    tokens, the rows' positions in order; ``rest_logp``: ``(positions,)`` log of the remaining mass.
    """

    rows: list[list[int]]
    positions: list[list[int]]
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    rest_logp: torch.Tensor


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable near 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _forward(model: nn.Module, rows: list[list[int]], positions: list[list[int]], pad_id: int, block_inputs: Any) -> torch.Tensor:
    """Log-probabilities ``(sum of positions, V)`` at the given positions of right-padded ``rows``."""
    device = next(model.parameters()).device
    ids, mask = pad_rows(rows, pad_id)
    at = torch.zeros_like(ids, dtype=torch.bool)
    for b, pos in enumerate(positions):
        at[b, pos] = True
    ids, mask, at = ids.to(device), mask.to(device), at.to(device)
    context = block_inputs.forward(ids, mask) if block_inputs is not None else nullcontext()
    with context:
        logits = logits_at(model, ids, mask, at)
    return logits.float().log_softmax(-1)


@torch.no_grad()
def build_targets(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    tokens: int,
    block_inputs: Any = None,
    top: int = TOP_TOKENS,
    target: Optional[Sequence[int]] = None,
) -> NeighbourTargets:
    """:class:`NeighbourTargets` of ``prompts`` under ``model`` as it is now (the unedited model).

    Positions kept: the last prompt position and the next ``tokens − 1`` of the greedy
    continuation; with ``target`` (token ids), also every position predicting one of its tokens,
    teacher forced after each prompt (the prompt's last position counted once)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = [list(encode_prompt(tokenizer, p)) for p in prompts]
    rows = [list(r) for r in prompt_ids]
    for _ in range(tokens - 1):  # extend each row by the unedited model's greedy next token
        logp = _forward(model, rows, [[len(r) - 1] for r in rows], pad, block_inputs)
        nxt = logp.argmax(-1).tolist()
        rows = [r + [t] for r, t in zip(rows, nxt)]
    skip = 1 if target else 0  # the target rows hold the prompt's last position
    positions = [list(range(len(r) - tokens + skip, len(r))) for r in rows]
    keep = [i for i, pos in enumerate(positions) if pos]
    rows, positions = [rows[i] for i in keep], [positions[i] for i in keep]
    if target:
        target = list(target)
        for ids in prompt_ids:
            rows.append(ids + target[:-1])
            positions.append(list(range(len(ids) - 1, len(ids) - 1 + len(target))))
    logp = _forward(model, rows, positions, pad, block_inputs)  # (sum of positions, V)
    k = min(top, logp.shape[-1] - 1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    rest = _log1mexp(top_logp.logsumexp(-1))
    return NeighbourTargets(rows, positions, top_ids, top_logp, rest)


def neighbour_kl(model: nn.Module, tokenizer: Any, targets: Sequence[NeighbourTargets], block_inputs: Any = None) -> torch.Tensor:
    """Mean coarsened ``KL(p₀ ‖ p_θ)`` over every kept position of ``targets`` under ``model`` now."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [row for t in targets for row in t.rows]
    positions = [pos for t in targets for pos in t.positions]
    logq = _forward(model, rows, positions, pad, block_inputs)  # (N, V), rows' positions in order
    top_ids = torch.cat([t.top_ids.reshape(-1, t.top_ids.shape[-1]) for t in targets]).to(logq.device)
    top_logp = torch.cat([t.top_logp.reshape(-1, t.top_logp.shape[-1]) for t in targets]).to(logq.device)
    rest_logp = torch.cat([t.rest_logp.reshape(-1) for t in targets]).to(logq.device)
    q_top = logq.gather(1, top_ids)
    q_rest = _log1mexp(q_top.logsumexp(-1))
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)
    return kl.mean()


class RelationNeighbours:
    """Per-request neighbour prompts and their unedited targets, filled lazily during a fit.

    Args:
        subjects: candidate other subjects (:func:`load_subjects`).
        prompts: neighbour prompts per request.
        tokens: positions per prompt (1 = the next token after the prompt only).
        seed: seed of the subject draws.
        top: unedited tokens kept exactly per position (``None`` = :data:`TOP_TOKENS`).
        on_target: also compare along each request's new target, teacher forced after every
            neighbour prompt: the edit must not make its new answer likelier for other subjects.
        choice: ``random`` (seeded draws), ``similar`` (the subjects nearest the request's
            under the model's input embeddings, :class:`SubjectIndex`: the subjects an edit is
            most likely to spill onto) or ``perturbed`` (near-copies of the request's own
            subject with one word swapped, :func:`perturbed_subjects`: names that differ from
            it in one place).
    """

    def __init__(
        self,
        subjects: Sequence[str],
        prompts: int,
        tokens: int,
        seed: int = 0,
        top: Optional[int] = None,
        choice: str = "random",
        on_target: bool = False,
    ):
        if choice not in CHOICES:
            raise ValueError(f"neighbour_choice must be one of {list(CHOICES)}, got {choice!r}")
        self.subjects, self.prompts, self.tokens, self.seed = list(subjects), int(prompts), int(tokens), int(seed)
        self.top = int(top if top is not None else TOP_TOKENS)
        self.choice = choice
        self.on_target = bool(on_target)
        self._index: Optional[SubjectIndex] = None
        self._words: Optional[list[str]] = None
        self._targets: dict[tuple, Optional[NeighbourTargets]] = {}

    def __len__(self) -> int:
        return sum(t is not None for t in self._targets.values())

    def missing(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Requests of ``requests`` whose targets are not computed yet (once each)."""
        return _unseen(requests, self._targets)

    def prompts_for(self, model: nn.Module, tokenizer: Any, request: EditRequest) -> list[str]:
        """``request``'s neighbour prompts under this object's subjects, count, seed and choice."""
        order = None
        if self.choice == "perturbed" and request.subject:
            if self._words is None:
                self._words = subject_words(self.subjects)
            variants = perturbed_subjects(request.subject, self._words, self.prompts, self.seed)
            return relation_prompts(request, variants, self.prompts, order=range(len(variants)))
        if self.choice == "similar" and request.subject:
            if self._index is None:
                self._index = SubjectIndex(model, tokenizer, self.subjects)
            order = self._index.nearest(request.subject, 4 * self.prompts + 16)
        return relation_prompts(request, self.subjects, self.prompts, self.seed, order)

    def fill(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], block_inputs: Any = None) -> None:
        """Compute the targets of ``requests`` under ``model`` as it is now (call with the unedited weights)."""
        for r in requests:
            prompts = self.prompts_for(model, tokenizer, r)
            target = encode_target(tokenizer, r.target_new) if self.on_target else None
            self._targets[_request_key(r)] = (
                build_targets(model, tokenizer, prompts, self.tokens, block_inputs, self.top, target) if prompts else None
            )

    def loss(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], block_inputs: Any = None) -> Optional[torch.Tensor]:
        """The mean KL over the neighbours of ``requests`` (``None`` when none of them has any)."""
        targets = [self._targets.get(_request_key(r)) for r in requests]
        targets = [t for t in targets if t is not None]
        if not targets:
            return None
        return neighbour_kl(model, tokenizer, targets, block_inputs)


class NeighbourRise:
    """The new target's rise after the neighbour prompts, held down, filled lazily during a fit.

    For each request and each of its neighbour prompts (``neighbours``: the same prompts, choice
    and subjects as the KL term), the unedited model's mean token NLL of the request's *new*
    target teacher forced after the neighbour prompt, ``n₀``, is read once, the first time a fit
    sees the request (call :meth:`fill` with the tuned tensors put back to their originals); the
    term is then

        mean over the mini-batch's neighbour prompts of  max(0, n₀ − n_θ)

    the rise of the new target's mean token log-probability for the other subjects, in nats per
    token, counted only where it rose. It is what the neighbourhood score reads (the new target
    against the neighbour's own answer, teacher forced) and nothing else: the rest of the
    neighbours' distributions are free, so an edit that also teaches the answer's format (a
    short answer after a question) is not held back by it. One extra forward and backward per
    step over the neighbour prompts of the mini-batch's requests, from the cached block inputs
    when the fit keeps them.
    """

    def __init__(self, neighbours: RelationNeighbours):
        self.neighbours = neighbours
        self._rows: dict[tuple, Optional[tuple[list[EditRequest], torch.Tensor]]] = {}

    def __len__(self) -> int:
        """Requests with neighbour prompts read so far."""
        return sum(v is not None for v in self._rows.values())

    def missing(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Requests of ``requests`` not read yet (once each)."""
        return _unseen(requests, self._rows)

    @torch.no_grad()
    def fill(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], block_inputs: Any = None) -> None:
        """Read ``n₀`` for ``requests`` under ``model`` as it is now (call with the unedited weights),
        in one pass over every neighbour prompt of ``requests``."""
        per_request = []
        for r in requests:
            prompts = self.neighbours.prompts_for(model, tokenizer, r)
            per_request.append([EditRequest(prompt=p, target_new=r.target_new, case_id=r.case_id) for p in prompts])
        flat = [row for rows in per_request for row in rows]
        nll = (ft_loss(model, tokenizer, flat, "ft_m", append_eos=False, block_inputs=block_inputs, group_by_length=True)
               .detach().float() if flat else None)
        at = 0
        for r, rows in zip(requests, per_request):
            self._rows[_request_key(r)] = (rows, nll[at:at + len(rows)]) if rows else None
            at += len(rows)

    def loss(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], block_inputs: Any = None) -> Optional[torch.Tensor]:
        """The mean hinge over the neighbours of ``requests`` (``None`` when none of them has any)."""
        got = [self._rows.get(_request_key(r)) for r in requests]
        got = [g for g in got if g is not None]
        if not got:
            return None
        rows = [row for g in got for row in g[0]]
        nll = ft_loss(model, tokenizer, rows, "ft_m", append_eos=False, block_inputs=block_inputs, group_by_length=True)
        before = torch.cat([g[1] for g in got]).to(device=nll.device, dtype=nll.dtype)
        return torch.relu(before - nll).mean()


class NeighbourKeys:
    """Key-level relation-neighbour preservation, filled lazily during a fit.

    For every tuned linear weight ``W`` (original ``W₀``) it keeps the second moment
    ``C = E[k kᵀ]`` of that module's inputs over every position of the requests' neighbour
    prompts (each prompt followed by the request's new target but its last token, teacher
    forced: the positions the edit loss reads), computed under the unedited model, and
    penalises the relative change of the module's outputs there:

        tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ),   summed over the tuned weights.

    When only that module (and modules above it) are tuned, its inputs on a neighbour prompt do
    not change during the fit, so the term is the exact squared change of what the rest of the
    model receives from it on those prompts, at the cost of one small matrix product per step;
    no forward pass of the neighbours is needed after their keys are read. Prompts come from
    ``neighbours`` (:meth:`RelationNeighbours.prompts_for`: subjects, count, seed, choice).

    With ``own="subject"`` the keys of each request's own prompt and target are added too, at
    every position outside the subject's tokens: the words of the relation and the answer, which
    every subject asked the same question shares. The edit is then written through the subject's
    tokens and carried to the answer by the blocks above. ``own="fact_token"`` leaves out only
    the subject's last token, where locate-and-edit methods write: the subject's first words, which
    neighbouring names share, are held too. ``own="none"`` (default) adds nothing.
    """

    OWN = ("none", "subject", "fact_token")

    def __init__(self, neighbours: RelationNeighbours, own: str = "none"):
        if own not in self.OWN:
            raise ValueError(f"own must be one of {list(self.OWN)}, got {own!r}")
        self.neighbours = neighbours
        self.own = own
        self._seen: set[tuple] = set()
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._terms: dict[str, PreservationTerm] = {}  # built from the sums on first use, dropped when they grow

    def __len__(self) -> int:
        """Key positions read so far."""
        return self._count

    def missing(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Requests of ``requests`` whose keys are not read yet (once each)."""
        return _unseen(requests, self._seen)

    @torch.no_grad()
    def fill(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], modules: dict[str, nn.Module]) -> None:
        """Read the keys of ``requests``' neighbour prompts at ``modules`` (name -> linear module)
        under ``model`` as it is now (call with the unedited weights)."""
        rows: list[list[int]] = []
        skip: list[tuple[int, int]] = []  # per row, the token positions [a, b) left out
        for r in requests:
            self._seen.add(_request_key(r))
            target = encode_target(tokenizer, r.target_new)
            for prompt in self.neighbours.prompts_for(model, tokenizer, r):
                rows.append((encode_prompt(tokenizer, prompt) + target)[:-1])
                skip.append((0, 0))
            if self.own != "none" and r.subject and r.subject in r.prompt:
                first, end = subject_tokens(tokenizer, r)  # the positions of the row as encode_prompt writes it
                rows.append((encode_prompt(tokenizer, r.prompt) + target)[:-1])
                skip.append((first if self.own == "subject" else end - 1, end))
        if not rows:
            return
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(model.parameters()).device
        got: dict[str, torch.Tensor] = {}

        def reader(name: str):
            def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                got[name] = args[0] if args else next(iter(kwargs.values()))
                if len(got) == len(modules):
                    raise StopForward  # every module read: the blocks above are not needed
            return hook

        handles = [m.register_forward_pre_hook(reader(n), with_kwargs=True) for n, m in modules.items()]
        try:
            for start in range(0, len(rows), 64):
                ids, mask = pad_rows(rows[start : start + 64], pad)
                keep = mask.bool()  # the attention mask stays whole; the subject's positions are not read
                for b, (a, e) in enumerate(skip[start : start + 64]):
                    keep[b, a:e] = False
                got.clear()
                batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
                run_until_stopped(lambda batch=batch: model(**batch))
                keep = keep.to(device)
                for name, x in got.items():
                    k = x[keep].double()
                    s = k.T @ k
                    self._sums[name] = s if name not in self._sums else self._sums[name] + s
                self._count += int(keep.sum())
            self._terms.clear()
        finally:
            for h in handles:
                h.remove()

    def loss(self, weights: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The summed relative change on the neighbour keys read so far (``None`` before any);
        ``weights`` and ``originals`` as ``(out, in)``."""
        if not self._count:
            return None
        for name in self._sums.keys() - self._terms.keys():
            w = weights[name]
            self._terms[name] = PreservationTerm.build(self._sums[name] / self._count, originals[name].to(w.device))
        return preservation_loss(self._terms, weights)
