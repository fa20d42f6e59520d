"""The evaluation engine: every protocol's figures for a model on a list of requests, no Trainer needed.

    from lit_edit.evaluation import Evaluator

    evaluator = Evaluator(protocols=["probability", "token_accuracy", "generation"])
    before = evaluator.evaluate(model, tokenizer, requests)            # the unedited model
    ...                                                                 # edit the model
    after = evaluator.evaluate(model, tokenizer, requests, reference=before.reference)
    after.figures["gen_em/locality_agreement"]

:meth:`Evaluator.evaluate` returns an :class:`Evaluation`: the figures and the
:class:`EvaluationReference` they were compared with. Without a reference the evaluated model
is its own (agreements are 1.0) and the reference it produces is returned, ready for the
evaluation of the edited model. The :class:`~lit_edit.evaluation.EditEvaluation` callback runs
the same engine from Lightning's hooks.

Protocols and figures are described in :mod:`lit_edit.evaluation.protocols`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.data.corpus import corpus_name, load_texts
from lit_edit.data.request import EditRequest
from lit_edit.evaluation.divergence import TopKDistribution, next_token_logprobs, partition_kl, text_rows, top_k_distribution
from lit_edit.evaluation.harness import HarnessOptions, harness_options, run_harness
from lit_edit.evaluation.metrics import ExactMatch, NextTokenKL, Perplexity, ProbabilityComparison, TokenAccuracy
from lit_edit.evaluation.protocols import FLUENCY_TOKENS, PROTOCOLS, check_protocols
from lit_edit.evaluation.scoring import (
    greedy_generate,
    ngram_entropy,
    normalize_answer,
    score_and_generate,
    score_pairs,
    text_nll,
)
from lit_edit.options import check_int

log = logging.getLogger(__name__)

__all__ = ["GENERATION_BATCH_FACTOR", "Evaluation", "EvaluationReference", "Evaluator", "UneditedCache", "as_requests", "evaluate"]


GENERATION_BATCH_FACTOR = 4
"""A generation batch holds this many times the evaluator's ``batch_size`` prompts."""


@dataclass
class EvaluationReference:
    """What the unedited model produced, for the locality agreement figures of a later evaluation."""

    num_requests: int
    locality_argmax: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    """Argmax ids on each ``(locality prompt, answer)`` pair, teacher forced."""
    locality_generations: dict[str, str] = field(default_factory=dict)
    """Greedy generation (truncated) from each locality prompt."""
    kl: dict[int, TopKDistribution] = field(default_factory=dict)
    """The ``kl`` protocol's unedited next-token distributions (top-k + tail), by index of the KL text."""

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint-friendly form (lists and dicts of plain values and tensors)."""
        return {
            "num_requests": self.num_requests,
            "locality_argmax": [[prompt, answer, ids] for (prompt, answer), ids in self.locality_argmax.items()],
            "locality_generations": dict(self.locality_generations),
            "kl": [[index, {"ids": d.ids, "logprobs": d.logprobs, "tail": d.tail}] for index, d in self.kl.items()],
        }

    def merged(self, others: Sequence[EvaluationReference]) -> EvaluationReference:
        """This reference and ``others`` (e.g. every process's share) as one."""
        out = EvaluationReference(self.num_requests, dict(self.locality_argmax), dict(self.locality_generations), dict(self.kl))
        for other in others:
            out.locality_argmax.update(other.locality_argmax)
            out.locality_generations.update(other.locality_generations)
            out.kl.update(other.kl)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EvaluationReference:
        return cls(
            num_requests=state["num_requests"],
            locality_argmax={(prompt, answer): ids for prompt, answer, ids in state["locality_argmax"]},
            locality_generations=dict(state["locality_generations"]),
            kl={int(index): TopKDistribution(d["ids"], d["logprobs"], d["tail"]) for index, d in state.get("kl", [])},
        )


@dataclass
class Evaluation:
    """The result of :meth:`Evaluator.evaluate`."""

    figures: dict[str, float]
    """Every figure of the protocols, by name (figures without data are left out)."""
    reference: EvaluationReference
    """The reference the locality figures were compared with (built by this call when none was given)."""
    seconds: float


class Evaluator:
    """Scores a model on edit requests with the chosen protocols.

    Args:
        protocols: any of ``probability``, ``token_accuracy``, ``generation``, ``perplexity``,
            ``kl`` (next-token KL from the unedited model on held-out text,
            :mod:`lit_edit.evaluation.divergence`),
            ``fluency`` (64-token generations from the edit prompts) and ``harness``
            (lm-evaluation-harness tasks, :mod:`lit_edit.evaluation.harness`).
        batch_size: prompts per forward; a generation batch holds :data:`GENERATION_BATCH_FACTOR`
            times as many (sequences leave it as they finish, so a wide batch keeps each step's
            products large).
        max_new_tokens: generation budget of the exact-match protocol.
        ppl_corpus: perplexity text: ``wiki`` (offline Wikipedia, held-out split), a
            ``.txt``/``.json``/``.jsonl`` file, a list of strings, or a hub dataset name.
        ppl_texts: number of perplexity texts.
        ppl_max_length: tokens per perplexity text (truncated).
        harness: the lm-evaluation-harness tasks of the ``harness`` protocol
            (:class:`~lit_edit.evaluation.harness.HarnessOptions` or a mapping of its fields:
            ``{"tasks": ["arc_easy"], "limit": 200}``); needs ``pip install lit-edit[lmeval]``.
        kl_texts: number of held-out texts of the ``kl`` protocol (the first ones of
            ``ppl_corpus``, each truncated to ``ppl_max_length`` tokens), >= 1.
        kl_top_k: tokens of the unedited next-token distribution kept per position by the ``kl``
            protocol, >= 1 (the rest is kept as one tail mass; the figure is exact when this
            covers the vocabulary and a lower bound otherwise, :mod:`lit_edit.evaluation.divergence`).
            The reference holds ``kl_texts × ppl_max_length × kl_top_k × 8`` bytes at most.
    """

    def __init__(
        self,
        protocols: Sequence[str] = ("probability", "token_accuracy", "generation", "perplexity"),
        batch_size: int = 32,
        max_new_tokens: int = 32,
        ppl_corpus: Union[str, Sequence[str]] = "wiki",
        ppl_texts: int = 100,
        ppl_max_length: int = 128,
        harness: Union[HarnessOptions, dict, None] = None,
        kl_texts: int = 20,
        kl_top_k: int = 256,
    ):
        if batch_size < 1 or max_new_tokens < 1 or ppl_texts < 1 or ppl_max_length < 2:
            raise ValueError("batch_size, max_new_tokens and ppl_texts must be >= 1 and ppl_max_length >= 2")
        self.kl_texts = check_int("kl_texts", kl_texts, minimum=1)
        self.kl_top_k = check_int("kl_top_k", kl_top_k, minimum=1)
        self.protocols = check_protocols(protocols)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.ppl_corpus = ppl_corpus
        self.ppl_texts = ppl_texts
        self.ppl_max_length = ppl_max_length
        self._texts: Optional[list[str]] = None
        self._kl_texts: Optional[list[str]] = None
        self.harness = harness_options(harness, self.protocols)

    def with_protocols(self, protocols: Sequence[str]) -> Evaluator:
        """The same settings restricted to ``protocols`` (shares the loaded perplexity texts)."""
        other = object.__new__(Evaluator)
        other.__dict__.update(self.__dict__)
        other.protocols = check_protocols(protocols)
        return other

    @property
    def generation_batch_size(self) -> int:
        """Prompts per generation batch."""
        return GENERATION_BATCH_FACTOR * self.batch_size

    @property
    def needs_requests(self) -> bool:
        """Whether any protocol scores requests (perplexity alone does not)."""
        return any(p not in ("perplexity", "kl", "harness") for p in self.protocols)

    # ------------------------------------------------------------------ descriptions

    def corpus_label(self) -> str:
        source = self.ppl_corpus
        if isinstance(source, str) and source.partition(":")[0] == "wiki":
            return f"offline Wikipedia ({source.partition(':')[2] or 'heldout'} split)"
        return str(source) if isinstance(source, (str, os.PathLike)) else "a given list of texts"

    def describe(self, protocol: str) -> str:
        """The recorded description of ``protocol`` with these settings."""
        return PROTOCOLS[protocol].format(
            max_new_tokens=self.max_new_tokens,
            ppl_texts=len(self._texts) if self._texts is not None else self.ppl_texts,
            ppl_corpus=self.corpus_label(),
            ppl_max_length=self.ppl_max_length,
            fluency_tokens=FLUENCY_TOKENS,
            harness=self.harness.describe() if self.harness is not None else "",
            kl_texts=len(self._kl_texts) if self._kl_texts is not None else self.kl_texts,
            kl_top_k=self.kl_top_k,
        )

    def descriptions(self) -> dict[str, str]:
        """``{protocol: description}`` for every selected protocol."""
        return {p: self.describe(p) for p in self.protocols}

    def perplexity_texts(self) -> list[str]:
        """The held-out perplexity texts (read once)."""
        if self._texts is None:
            self._texts = self._heldout(self.ppl_texts, "perplexity")
        return self._texts

    def kl_text_list(self) -> list[str]:
        """The held-out texts of the ``kl`` protocol: the first ``kl_texts`` of ``ppl_corpus`` (read once)."""
        if self._kl_texts is None:
            self._kl_texts = self._heldout(self.kl_texts, "KL")
        return self._kl_texts

    def _heldout(self, limit: Optional[int], what: str) -> list[str]:
        """The first ``limit`` held-out texts of ``ppl_corpus``; an empty corpus is an error."""
        texts = load_texts(self.ppl_corpus, split="heldout", limit=limit)
        if not texts:
            raise ValueError(f"{what} corpus {self.corpus_label()!r} has no text")
        return texts

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        reference: Union[EvaluationReference, nn.Module, None] = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        partial: bool = False,
    ) -> Evaluation:
        """Every figure of the protocols for ``model`` on ``requests``.

        Args:
            reference: what the locality agreement figures compare with: an
                :class:`EvaluationReference` from an earlier call, or the unedited model itself.
                ``None``: the evaluated model is its own reference, returned in the result.
            rank, world_size: score only the ``rank``-th share of the requests and perplexity
                texts (metric states are sums, reduced across processes by torchmetrics).
            partial: ``requests`` are a subset of those the reference was built for (one edit
                batch of an immediate evaluation).
        """
        requests = list(requests)
        started = time.perf_counter()
        if isinstance(reference, nn.Module):
            reference = self.make_reference(reference, tokenizer, requests[rank::world_size], num_requests=len(requests))
        if reference is not None and reference.num_requests != len(requests) and not partial:
            raise ValueError(f"the reference covers {reference.num_requests} requests, this evaluation {len(requests)}")
        mine = requests[rank::world_size]  # each process scores its share; metric states are summed
        made = EvaluationReference(num_requests=len(requests)) if reference is None else None
        ref = reference if reference is not None else made
        figures: dict[str, torch.Tensor] = {}

        shared = self._prompt_pass(model, tokenizer, mine, ref, made) if self.shares_prompts else None
        if "probability" in self.protocols or "token_accuracy" in self.protocols:
            figures.update(self._teacher_forced(model, tokenizer, mine, ref, made, shared))
        if "generation" in self.protocols:
            figures.update(self._generation(model, tokenizer, mine, ref, made, shared))
        if "fluency" in self.protocols:
            texts = greedy_generate(
                model, tokenizer, [r.prompt for r in mine], FLUENCY_TOKENS, self.generation_batch_size, stop_strings=(), progress=True
            )
            metric = _mean_metric()
            metric.update(torch.tensor([ngram_entropy(t) for t in texts], dtype=torch.float64))
            figures["fluency/ngram_entropy"] = metric.compute()
        if "harness" in self.protocols:
            figures.update({k: torch.tensor(v, dtype=torch.float64) for k, v in run_harness(model, tokenizer, self.harness, self.batch_size).items()})
        if "perplexity" in self.protocols:
            texts = self.perplexity_texts()[rank::world_size]
            total, count = text_nll(model, tokenizer, texts, self.ppl_max_length, self.batch_size, progress=True)
            metric = Perplexity()
            metric.update(total, count)
            figures[f"ppl/{corpus_name(self.ppl_corpus)}"] = metric.compute()
        if "kl" in self.protocols:
            figures.update(self._kl(model, tokenizer, ref, made, rank, world_size))
        out = {k: float(v) for k, v in figures.items() if math.isfinite(float(v))}
        seconds = time.perf_counter() - started
        log.info("evaluated %d requests in %.1f s", len(requests), seconds)
        return Evaluation(figures=out, reference=ref, seconds=seconds)

    def make_reference(
        self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], num_requests: Optional[int] = None
    ) -> EvaluationReference:
        """What ``model`` (the unedited one) answers on the locality prompts of ``requests``.

        Records the teacher-forced argmax on each locality answer (``token_accuracy``) and the
        greedy generation from each locality prompt (``generation``).
        """
        ref = EvaluationReference(num_requests=len(requests) if num_requests is None else num_requests)
        pairs = list(dict.fromkeys((x.prompt, x.answer) for r in requests for x in r.locality))
        if "token_accuracy" in self.protocols and "generation" in self.protocols and pairs:
            prompts = list(dict.fromkeys(p for p, _ in pairs))
            answers: dict[str, list[str]] = {p: [] for p in prompts}
            for p, a in pairs:
                answers[p].append(a)
            scores, texts = score_and_generate(
                model, tokenizer, prompts, [answers[p] for p in prompts], [True] * len(prompts), self.max_new_tokens,
                self.generation_batch_size, progress=True,
            )
            for p, got in zip(prompts, scores):
                ref.locality_argmax.update({(p, a): pred for a, (_, (pred, _)) in zip(answers[p], got)})
            ref.locality_generations.update(zip(prompts, texts))
            pairs = []
        if "token_accuracy" in self.protocols and pairs:
            _, tokens = score_pairs(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], self.batch_size, progress=True)
            ref.locality_argmax.update({pair: pred for pair, (pred, _) in zip(pairs, tokens)})
        if "generation" in self.protocols and pairs:
            prompts = list(dict.fromkeys(p for p, _ in pairs))
            texts = greedy_generate(model, tokenizer, prompts, self.max_new_tokens, self.generation_batch_size, progress=True)
            ref.locality_generations.update(zip(prompts, texts))
        if "kl" in self.protocols:
            self._kl(model, tokenizer, None, ref, 0, 1)
        return ref

    def _kl(self, model, tokenizer, ref, made, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """The ``kl`` figures of ``model`` against ``ref`` (``None``: ``model`` is the unedited one,
        its top-k distributions go into ``made`` and the figures are 0 by definition)."""
        from lit_edit.evaluation.scoring import with_progress

        texts = self.kl_text_list()
        indices = list(range(rank, len(texts), world_size))
        rows = text_rows(tokenizer, [texts[i] for i in indices], self.ppl_max_length)
        metric = NextTokenKL()
        scored = next_token_logprobs(model, tokenizer, rows, self.batch_size)
        for j, logprobs in with_progress(scored, total=sum(len(r) >= 2 for r in rows), desc="kl"):
            index = indices[j]
            if ref is None or ref is made:
                made.kl[index] = top_k_distribution(logprobs, self.kl_top_k)
                metric.update(torch.zeros(logprobs.shape[0], dtype=torch.float64))
                continue
            stored = _lookup(ref.kl, index, "kl")
            if stored.k != min(self.kl_top_k, logprobs.shape[-1]):
                raise ValueError(f"the reference keeps the top {stored.k} tokens per position, this evaluation kl_top_k={self.kl_top_k}: "
                                 "build the reference with the same kl_top_k")
            try:
                metric.update(partition_kl(stored, logprobs))
            except ValueError as e:
                raise ValueError(f"KL text {index}: {e}; build the reference with the same texts and ppl_max_length") from None
        name = corpus_name(self.ppl_corpus)
        computed = metric.compute()
        return {f"kl/{name}": computed["mean"], f"kl/{name}/p95": computed["p95"]}

    @property
    def shares_prompts(self) -> bool:
        """Whether teacher forcing and generation run from one pass over each prompt
        (:func:`~lit_edit.evaluation.scoring.score_and_generate`): both kinds of protocol selected."""
        return "generation" in self.protocols and ("probability" in self.protocols or "token_accuracy" in self.protocols)

    def _prompt_pass(self, model, tokenizer, requests, ref, made) -> dict[str, Any]:
        """Teacher-forced scores of every pair and the generation from every prompt, one pass
        over each distinct prompt: ``{"nll": {pair: nll}, "argmax": {pair: (pred, gold)},
        "generations": {prompt: text}}``.

        A continuation whose only use is its exact match with known strings (the target for edit
        and paraphrase prompts, the answer for portability prompts, and for a locality prompt its
        answer and the reference's generation) stops once it can match none of them; a locality
        continuation that becomes the reference (``made``) runs in full."""
        pairs = self._teacher_forced_pairs(requests)
        generated = self._generation_prompts(requests)
        answers: dict[str, Optional[list[str]]] = {}

        def expect(prompt: str, options: Optional[list[str]]) -> None:
            if options is None or (prompt in answers and answers[prompt] is None):
                answers[prompt] = None
            else:
                answers[prompt] = [*answers.get(prompt, []), *options]

        for r in requests:
            for p in (r.prompt, *r.paraphrase_prompts):
                expect(p, [r.target_new])
            for x in r.locality:
                before = None if ref is None or ref is made else ref.locality_generations.get(x.prompt)
                expect(x.prompt, None if before is None else [x.answer, before])
            for x in r.portability:
                expect(x.prompt, [x.answer])
        prompts = list(dict.fromkeys([*generated, *(p for p, _ in pairs)]))
        targets: dict[str, list[str]] = {p: [] for p in prompts}
        for p, t in pairs:
            targets[p].append(t)
        wanted = set(generated)
        scores, texts = score_and_generate(
            model, tokenizer, prompts, [targets[p] for p in prompts], [p in wanted for p in prompts], self.max_new_tokens,
            self.generation_batch_size, progress=True, answers=[answers.get(p) for p in prompts],
        )
        nll: dict[tuple[str, str], torch.Tensor] = {}
        argmax: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for p, got in zip(prompts, scores):
            for t, (value, tokens) in zip(targets[p], got):
                nll[p, t] = torch.tensor(value, dtype=torch.float32)
                argmax[p, t] = tokens
        return {"nll": nll, "argmax": argmax, "generations": {p: x for p, x in zip(prompts, texts) if p in wanted}}

    def _teacher_forced_pairs(self, requests) -> dict[tuple[str, str], int]:
        """Every distinct (prompt, target) pair the teacher-forced protocols score."""
        want_prob = "probability" in self.protocols
        want_tok = "token_accuracy" in self.protocols
        pairs: dict[tuple[str, str], int] = {}

        def need(prompt: str, target: str) -> None:
            pairs.setdefault((prompt, target), len(pairs))

        for r in requests:
            need(r.prompt, r.target_new)
            for p in r.paraphrase_prompts:
                need(p, r.target_new)
            for loc in r.locality:
                need(loc.prompt, loc.answer)
                if want_prob:
                    need(loc.prompt, r.target_new)
            if want_prob and r.ground_truth is not None:
                need(r.prompt, r.ground_truth)
                for p in r.paraphrase_prompts:
                    need(p, r.ground_truth)
            if want_tok:
                for port in r.portability:
                    need(port.prompt, port.answer)
        return pairs

    def _generation_prompts(self, requests) -> list[str]:
        """Every distinct prompt the generation protocol continues."""
        prompts: dict[str, int] = {}
        for r in requests:
            for p in (r.prompt, *r.paraphrase_prompts, *(x.prompt for x in r.locality), *(x.prompt for x in r.portability)):
                prompts.setdefault(p, len(prompts))
        return list(prompts)

    def _teacher_forced(self, model, tokenizer, requests, ref, made, shared=None) -> dict[str, torch.Tensor]:
        want_prob = "probability" in self.protocols
        want_tok = "token_accuracy" in self.protocols
        pairs = self._teacher_forced_pairs(requests)
        keys = list(pairs)
        if shared is not None:
            score = {k: shared["nll"][k] for k in keys}
            argmax = {k: shared["argmax"][k] for k in keys} if want_tok else {}
        elif keys:
            nll, tokens = score_pairs(
                model, tokenizer, [k[0] for k in keys], [k[1] for k in keys], self.batch_size, with_argmax=want_tok, progress=True
            )
        else:
            nll, tokens = torch.zeros(0), []
        if shared is None:
            score = {k: nll[i] for k, i in pairs.items()}
            argmax = {k: tokens[i] for k, i in pairs.items()} if tokens else {}
        if made is not None and want_tok:
            for r in requests:
                for loc in r.locality:
                    made.locality_argmax[(loc.prompt, loc.answer)] = argmax[(loc.prompt, loc.answer)][0]

        out: dict[str, torch.Tensor] = {}
        if want_prob:
            prob = ProbabilityComparison()
            for r in requests:
                if r.ground_truth is not None:
                    prob.update([score[(r.prompt, r.target_new)]], [score[(r.prompt, r.ground_truth)]], "edit")
                    paras = r.paraphrase_prompts
                    if paras:
                        prob.update([score[(p, r.target_new)] for p in paras], [score[(p, r.ground_truth)] for p in paras], "paraphrase")
                if r.locality:
                    prob.update(
                        [score[(loc.prompt, r.target_new)] for loc in r.locality],
                        [score[(loc.prompt, loc.answer)] for loc in r.locality],
                        "neighborhood",
                    )
            out.update({f"prob/{k}": v for k, v in prob.compute().items()})
        if want_tok:
            accs = {name: TokenAccuracy() for name in ("reliability", "generalization", "locality", "portability")}
            for r in requests:
                accs["reliability"].update(*argmax[(r.prompt, r.target_new)])
                for p in r.paraphrase_prompts:
                    accs["generalization"].update(*argmax[(p, r.target_new)])
                for loc in r.locality:
                    now = argmax[(loc.prompt, loc.answer)][0]
                    accs["locality"].update(now, _lookup(ref.locality_argmax, (loc.prompt, loc.answer), "token_accuracy"))
                for port in r.portability:
                    accs["portability"].update(*argmax[(port.prompt, port.answer)])
            out.update({f"tok_acc/{k}": _quiet_compute(m) for k, m in accs.items()})
        return out

    def _generation(self, model, tokenizer, requests, ref, made, shared=None) -> dict[str, torch.Tensor]:
        if shared is not None:
            gen = shared["generations"]
        else:
            prompts = self._generation_prompts(requests)
            texts = greedy_generate(model, tokenizer, prompts, self.max_new_tokens, self.generation_batch_size, progress=True)
            gen = dict(zip(prompts, texts))
        if made is not None:
            made.locality_generations.update({x.prompt: gen[x.prompt] for r in requests for x in r.locality})
        ems = {name: ExactMatch() for name in ("reliability", "generalization", "locality", "portability")}
        agreement = _mean_metric()
        for r in requests:
            ems["reliability"].update([gen[r.prompt]], [r.target_new])
            ems["generalization"].update([gen[p] for p in r.paraphrase_prompts], [r.target_new] * len(r.paraphrase_prompts))
            ems["locality"].update([gen[x.prompt] for x in r.locality], [x.answer for x in r.locality])
            for x in r.locality:
                before = _lookup(ref.locality_generations, x.prompt, "generation")
                same = normalize_answer(gen[x.prompt]) == normalize_answer(before)
                agreement.update(torch.tensor(float(same), dtype=torch.float64))
            ems["portability"].update([gen[x.prompt] for x in r.portability], [x.answer for x in r.portability])
        out = {f"gen_em/{k}": _quiet_compute(m) for k, m in ems.items()}
        out["gen_em/locality_agreement"] = _quiet_compute(agreement)
        return out


class UneditedCache:
    """The unedited model's evaluation kept on disk, so a second run on the same model, requests
    and evaluation settings skips it.

    Files live under ``<cache root>/unedited/<sha>.json``; the key holds the model's weights
    fingerprint (:func:`~lit_edit.models.weights_fingerprint`), every request, the protocol
    descriptions, the batch size, the process share and, when prompts go through a chat template
    (:mod:`lit_edit.data.chat`), that template's wrapping. A file whose key differs, or that cannot
    be read, or whose figures are not finite, is ignored (recomputed, with one log line).
    """

    def __init__(self, directory: Optional[Union[str, os.PathLike]] = None):
        from lit_edit.io import cache_root

        self.directory = Path(directory) if directory is not None else cache_root() / "unedited"

    @staticmethod
    def key(
        evaluator: Evaluator, model: nn.Module, requests: Sequence[EditRequest], rank: int, world_size: int, tokenizer: Any = None
    ) -> dict[str, Any]:
        from lit_edit.data.chat import prompt_format
        from lit_edit.models import weights_fingerprint

        fmt = prompt_format(tokenizer)  # the chat wrapping, when one is applied (raw text keeps the key it had)
        return json.loads(json.dumps({
            "format": "lit_edit.unedited/1",
            "weights": weights_fingerprint(model),
            "requests": [r.to_dict() for r in requests],
            "protocols": evaluator.descriptions(),
            "ppl_corpus": str(evaluator.ppl_corpus) if isinstance(evaluator.ppl_corpus, (str, os.PathLike)) else list(evaluator.ppl_corpus),
            "batch_size": evaluator.batch_size,
            "share": [rank, world_size],
            **({"kl": {"texts": evaluator.kl_texts, "top_k": evaluator.kl_top_k, "max_length": evaluator.ppl_max_length}}
               if "kl" in evaluator.protocols else {}),
            **({"chat_template": fmt.describe()} if fmt.chat else {}),
        }, default=str))

    @staticmethod
    def evaluate(
        cache: Optional[UneditedCache],
        evaluator: Evaluator,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        rank: int = 0,
        world_size: int = 1,
    ) -> Evaluation:
        """``evaluator.evaluate(model, tokenizer, requests)`` (the unedited model, its own reference),
        read from ``cache`` when it holds this evaluation and written to it otherwise (``None``: no cache)."""
        key = cache.key(evaluator, model, requests, rank, world_size, tokenizer) if cache is not None else None
        result = cache.load(key) if cache is not None else None
        if result is None:
            result = evaluator.evaluate(model, tokenizer, requests, rank=rank, world_size=world_size)
            if cache is not None:
                cache.save(key, result)
        return result

    def _path(self, key: dict[str, Any]) -> Path:
        return self.directory / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")

    def load(self, key: dict[str, Any]) -> Optional[Evaluation]:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored["key"] != key:
                raise ValueError("its key differs")
            figures = {str(k): float(v) for k, v in stored["figures"].items()}
            if not all(math.isfinite(v) for v in figures.values()):
                raise ValueError("it holds non-finite figures")
            ref = stored["reference"]
            reference = EvaluationReference(
                num_requests=int(ref["num_requests"]),
                locality_argmax={(p, a): torch.tensor(ids, dtype=torch.long) for p, a, ids in ref["locality_argmax"]},
                locality_generations={str(k): str(v) for k, v in ref["locality_generations"].items()},
                kl={int(index): TopKDistribution.from_state_dict(d) for index, d in ref.get("kl", [])},
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("unedited-evaluation cache %s is unusable (%s); evaluating again", path, e)
            return None
        log.info("unedited figures and reference from the cache %s (same weights, requests and settings)", path)
        return Evaluation(figures=figures, reference=reference, seconds=0.0)

    def save(self, key: dict[str, Any], result: Evaluation) -> Path:
        from lit_edit.io import atomic_write

        ref = result.reference
        record = {
            "key": key,
            "figures": result.figures,
            "reference": {
                "num_requests": ref.num_requests,
                "locality_argmax": [[p, a, ids.tolist()] for (p, a), ids in ref.locality_argmax.items()],
                "locality_generations": ref.locality_generations,
                **({"kl": [[index, d.state_dict()] for index, d in sorted(ref.kl.items())]} if ref.kl else {}),
            },
        }
        text = json.dumps(record, ensure_ascii=False)
        return atomic_write(self._path(key), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    reference: Union[EvaluationReference, nn.Module, None] = None,
    **settings: Any,
) -> Evaluation:
    """``Evaluator(**settings).evaluate(model, tokenizer, requests, reference)``."""
    return Evaluator(**settings).evaluate(model, tokenizer, requests, reference)


def as_requests(source: Union[str, os.PathLike, Sequence[EditRequest], None]) -> list[EditRequest]:
    """Requests to evaluate from a list of :class:`EditRequest`, a file or data set name readable by
    :func:`lit_edit.data.load_requests`, or ``None`` (no requests)."""
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        from lit_edit.data.loaders import load_requests

        source = load_requests(source)
    requests = list(source)
    bad = [type(r).__name__ for r in requests if not isinstance(r, EditRequest)]
    if bad:
        raise TypeError(f"requests must be EditRequest objects, got {bad[0]}")
    return requests


def _lookup(table: dict, key: Any, protocol: str) -> Any:
    try:
        return table[key]
    except KeyError:
        raise ValueError(
            f"the reference has no {protocol} output for {key!r}: build it with the same requests and the "
            f"{protocol!r} protocol enabled"
        ) from None


def _mean_metric():
    from torchmetrics.aggregation import MeanMetric

    return MeanMetric(nan_strategy="error")


def _quiet_compute(metric) -> torch.Tensor:
    """``compute()`` without torchmetrics' warning for a metric that saw no data (gives NaN)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        value = metric.compute()
    return torch.as_tensor(value, dtype=torch.float64)

