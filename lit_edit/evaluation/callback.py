"""``EditEvaluation``: before/after evaluation of an edit as a Lightning callback.

At ``on_fit_start`` the unedited model is evaluated ("before"); at ``on_fit_end`` every request
is evaluated again on the final model ("after", i.e. *after-all* timing: retention, not
immediate success). Every figure is logged to the trainer's loggers as ``<figure>/before``,
``<figure>/after`` and ``<figure>/delta``, written to ``summary.json`` with the protocol that
produced it, and printed as a table.

Figures (each name carries its protocol):

``prob/ES, prob/EM, prob/PS, prob/PM, prob/NS, prob/NM, prob/S``
    CounterFact probability comparison (×100). ES/EM and PS/PM need ``ground_truth`` (requests
    without it are skipped); NS/NM compare P(locality answer) with P(target_new) on the locality
    prompts; S is the harmonic mean of ES, PS and NS.
``tok_acc/reliability, tok_acc/generalization, tok_acc/locality, tok_acc/portability``
    Teacher-forced token accuracy. Locality is the agreement of the argmax tokens on the
    locality answers with those of the reference (unedited) model, so it is 1.0 before.
``gen_em/reliability, gen_em/generalization, gen_em/locality, gen_em/locality_agreement, gen_em/portability``
    Greedy generation exact match (normalized). ``locality_agreement``: the generation on the
    locality prompt equals the reference model's generation.
``ppl/<corpus>``
    Token-weighted perplexity on held-out generic text (offline Wikipedia by default).
``fluency/ngram_entropy``
    N-gram entropy (×100) of 64-token greedy generations from the edit prompts (opt-in).

Figures with no data (e.g. no paraphrases) are left out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_edit.data.corpus import corpus_name, corpus_version, load_texts
from lit_edit.data.request import EditRequest
from lit_edit.evaluation.metrics import ExactMatch, Perplexity, ProbabilityComparison, TokenAccuracy
from lit_edit.evaluation.scoring import greedy_generate, ngram_entropy, normalize_answer, score_pairs, text_nll
from lit_edit.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["EditEvaluation", "EvaluationReference", "PROTOCOLS", "TIMING"]

PROTOCOLS: dict[str, str] = {
    "probability": "probability comparison: P(o|x) = exp(-mean token NLL of ' o' after x), teacher forced; ×100",
    "token_accuracy": "token accuracy: teacher forced, fraction of target tokens that are the argmax, mean over examples",
    "generation": "generation exact match: greedy, ≤{max_new_tokens} new tokens, stop at '.', newline or EOS, normalized",
    "perplexity": "perplexity: exp(token-weighted mean NLL) over {ppl_texts} texts from {ppl_corpus}, ≤{ppl_max_length} tokens each",
    "fluency": "fluency: n-gram entropy (2/3·H2 + 4/3·H3)/2 in bits ×100 of {fluency_tokens}-token greedy generations from the edit prompts",
}
"""The evaluation protocols, with the description recorded for each of their figures."""

FIGURES: dict[str, str] = {
    "prob/ES": "edit success: mean 1[P(target_new) > P(ground_truth)] on the edit prompt",
    "prob/EM": "edit magnitude: mean P(target_new) - P(ground_truth) on the edit prompt",
    "prob/PS": "paraphrase success: mean 1[P(target_new) > P(ground_truth)] on paraphrases",
    "prob/PM": "paraphrase magnitude: mean P(target_new) - P(ground_truth) on paraphrases",
    "prob/NS": "neighborhood success: mean 1[P(locality answer) > P(target_new)] on locality prompts",
    "prob/NM": "neighborhood magnitude: mean P(locality answer) - P(target_new) on locality prompts",
    "prob/S": "score: harmonic mean of ES, PS and NS",
    "tok_acc/reliability": "target_new after the edit prompt",
    "tok_acc/generalization": "target_new after each paraphrase",
    "tok_acc/locality": "argmax tokens on the locality answer agree with the reference (unedited) model's",
    "tok_acc/portability": "portability answer after its prompt",
    "gen_em/reliability": "generation from the edit prompt equals target_new",
    "gen_em/generalization": "generation from each paraphrase equals target_new",
    "gen_em/locality": "generation from each locality prompt equals its answer",
    "gen_em/locality_agreement": "generation from each locality prompt equals the reference (unedited) model's",
    "gen_em/portability": "generation from each portability prompt equals its answer",
    "fluency/ngram_entropy": "mean over the edit prompts",
}

TIMING = {
    "after-all": "every request evaluated on the final model, after all edits (retention)",
    "immediate": (
        "each edit batch's requests evaluated right after that batch is applied (before any restore); "
        "figures are request-weighted means over the batches of the last epoch; perplexity and fluency "
        "are measured once, on the final model"
    ),
}
_PER_BATCH = ("probability", "token_accuracy", "generation")
FLUENCY_TOKENS = 64


@dataclass
class EvaluationReference:
    """What the unedited model produced, for the locality agreement figures of a later evaluation."""

    num_requests: int
    locality_argmax: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    """Argmax ids on each ``(locality prompt, answer)`` pair, teacher forced."""
    locality_generations: dict[str, str] = field(default_factory=dict)
    """Greedy generation (truncated) from each locality prompt."""


class EditEvaluation(L.Callback):
    """Evaluate the edited model before and after ``fit``; log, save and print the figures.

    Args:
        protocols: any of ``probability``, ``token_accuracy``, ``generation``, ``perplexity``
            and ``fluency`` (opt-in: 64-token generations from the edit prompts).
        requests: requests to evaluate (a list of :class:`EditRequest` or a file readable by
            :func:`lit_edit.data.load_requests`); default: ``trainer.datamodule.eval_requests``.
        limit: evaluate at most this many requests.
        batch_size: prompts per forward / generation batch.
        max_new_tokens: generation budget of the exact-match protocol.
        ppl_corpus: perplexity text: ``wiki`` (offline Wikipedia, held-out split), a
            ``.txt``/``.json``/``.jsonl`` file, a list of strings, or a hub dataset name.
        ppl_texts: number of perplexity texts.
        ppl_max_length: tokens per perplexity text (truncated).
        summary_dir: where ``summary.json`` goes (default: the trainer's log dir, else cwd).
        print_table: print the ``metric | before | after | delta`` table at the end.
        timing: ``after-all`` (every request on the final model: retention) or ``immediate``
            (each batch's requests right after that batch's edit, before an editor with
            ``accumulate=False`` restores the weights: single / batched editing).
    """

    def __init__(
        self,
        protocols: Sequence[str] = ("probability", "token_accuracy", "generation", "perplexity"),
        requests: Union[str, Sequence[EditRequest], None] = None,
        limit: Optional[int] = None,
        batch_size: int = 32,
        max_new_tokens: int = 32,
        ppl_corpus: Union[str, Sequence[str]] = "wiki",
        ppl_texts: int = 100,
        ppl_max_length: int = 128,
        summary_dir: Optional[str] = None,
        print_table: bool = True,
        timing: str = "after-all",
    ):
        if isinstance(protocols, str):
            protocols = [p.strip() for p in protocols.split(",") if p.strip()]
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise ValueError(f"unknown evaluation protocol(s) {unknown or list(protocols)}; valid: {list(PROTOCOLS)}")
        if timing not in TIMING:
            raise ValueError(f"unknown evaluation timing {timing!r}; valid: {list(TIMING)}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        if batch_size < 1 or max_new_tokens < 1 or ppl_texts < 1 or ppl_max_length < 2:
            raise ValueError("batch_size, max_new_tokens and ppl_texts must be >= 1 and ppl_max_length >= 2")
        self.protocols = tuple(dict.fromkeys(protocols))
        self.requests = requests
        self.limit = limit
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.ppl_corpus = ppl_corpus
        self.ppl_texts = ppl_texts
        self.ppl_max_length = ppl_max_length
        self.summary_dir = summary_dir
        self.print_table = print_table
        self.timing = timing
        self._immediate: dict[str, list[float]] = {}
        self.reference: Optional[EvaluationReference] = None
        self.before: Optional[dict[str, float]] = None
        self.after: Optional[dict[str, float]] = None
        self.summary_path: Optional[Path] = None
        self._texts: Optional[list[str]] = None
        self._requests: list[EditRequest] = []
        self._seconds: dict[str, float] = {}
        self._restored = False

    # ------------------------------------------------------------------ inputs

    def _resolve_requests(self, trainer: Optional["L.Trainer"]) -> list[EditRequest]:
        requests: Any = self.requests
        if requests is None and trainer is not None:
            requests = getattr(getattr(trainer, "datamodule", None), "eval_requests", None)
            if callable(requests):
                requests = requests()
        if requests is None:
            if self._needs_requests():
                raise ValueError(
                    "EditEvaluation has no requests: pass `requests=` or use a datamodule with `eval_requests`"
                )
            return []
        if isinstance(requests, (str, os.PathLike)):
            from lit_edit.data.loaders import load_requests

            requests = load_requests(requests)
        requests = list(requests)
        bad = [type(r).__name__ for r in requests if not isinstance(r, EditRequest)]
        if bad:
            raise TypeError(f"requests must be EditRequest objects, got {bad[0]}")
        return requests[: self.limit] if self.limit is not None else requests

    def _needs_requests(self) -> bool:
        return any(p != "perplexity" for p in self.protocols)

    def _ppl_texts(self) -> list[str]:
        if self._texts is None:
            self._texts = load_texts(self.ppl_corpus, split="heldout", limit=self.ppl_texts)
            if not self._texts:
                raise ValueError(f"perplexity corpus {self._corpus_label()!r} has no text")
        return self._texts

    def _corpus_label(self) -> str:
        source = self.ppl_corpus
        if isinstance(source, str) and source.partition(":")[0] == "wiki":
            return f"offline Wikipedia ({source.partition(':')[2] or 'heldout'} split)"
        return str(source) if isinstance(source, (str, os.PathLike)) else "a given list of texts"

    def protocol_description(self, protocol: str) -> str:
        """The recorded description of ``protocol`` with this callback's settings."""
        return PROTOCOLS[protocol].format(
            max_new_tokens=self.max_new_tokens,
            ppl_texts=len(self._texts) if self._texts is not None else self.ppl_texts,
            ppl_corpus=self._corpus_label(),
            ppl_max_length=self.ppl_max_length,
            fluency_tokens=FLUENCY_TOKENS,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        reference: Union[EvaluationReference, nn.Module, None] = None,
    ) -> dict[str, float]:
        """Every figure of the configured protocols for ``model`` on ``requests``.

        ``reference`` is what the locality agreement figures compare with: an
        :class:`EvaluationReference` from an earlier call, or the unedited model itself. When it
        is ``None`` the evaluated model is its own reference (agreements are 1.0) and the
        reference it produces is kept in :attr:`reference` for a later call.
        """
        return self._evaluate(model, tokenizer, list(requests), reference, rank=0, world_size=1)

    def _evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: list[EditRequest],
        reference: Union[EvaluationReference, nn.Module, None],
        rank: int,
        world_size: int,
        subset: bool = False,
    ) -> dict[str, float]:
        if isinstance(reference, nn.Module):
            reference = self.make_reference(reference, tokenizer, requests[rank::world_size], num_requests=len(requests))
        if reference is not None and reference.num_requests != len(requests) and not subset:
            raise ValueError(f"the reference covers {reference.num_requests} requests, this evaluation {len(requests)}")
        mine = requests[rank::world_size]  # each process scores its share; metric states are summed
        made = EvaluationReference(num_requests=len(requests)) if reference is None else None
        ref = reference if reference is not None else made
        figures: dict[str, torch.Tensor] = {}
        started = time.perf_counter()

        teacher = [p for p in self.protocols if p in ("probability", "token_accuracy")]
        if teacher:
            figures.update(self._teacher_forced(model, tokenizer, mine, ref, made))
        if "generation" in self.protocols:
            figures.update(self._generation(model, tokenizer, mine, ref, made))
        if "fluency" in self.protocols:
            texts = greedy_generate(model, tokenizer, [r.prompt for r in mine], FLUENCY_TOKENS, self.batch_size, stop_strings=(), progress=True)
            metric = _mean_metric()
            metric.update(torch.tensor([ngram_entropy(t) for t in texts], dtype=torch.float64))
            figures["fluency/ngram_entropy"] = metric.compute()
        if "perplexity" in self.protocols:
            texts = self._ppl_texts()[rank::world_size]
            total, count = text_nll(model, tokenizer, texts, self.ppl_max_length, self.batch_size, progress=True)
            metric = Perplexity()
            metric.update(total, count)
            figures[f"ppl/{corpus_name(self.ppl_corpus)}"] = metric.compute()
        if made is not None:
            self.reference = made
        out = {k: float(v) for k, v in figures.items() if math.isfinite(float(v))}
        log.info("evaluated %d requests in %.1f s", len(requests), time.perf_counter() - started)
        return out

    def make_reference(
        self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], num_requests: Optional[int] = None
    ) -> EvaluationReference:
        """What ``model`` (the unedited one) answers on the locality prompts of ``requests``.

        Records the teacher-forced argmax on each locality answer (``token_accuracy``) and the
        greedy generation from each locality prompt (``generation``).
        """
        ref = EvaluationReference(num_requests=len(requests) if num_requests is None else num_requests)
        pairs = list(dict.fromkeys((x.prompt, x.answer) for r in requests for x in r.locality))
        if "token_accuracy" in self.protocols and pairs:
            _, tokens = score_pairs(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], self.batch_size)
            ref.locality_argmax.update({pair: pred for pair, (pred, _) in zip(pairs, tokens)})
        if "generation" in self.protocols and pairs:
            prompts = list(dict.fromkeys(p for p, _ in pairs))
            texts = greedy_generate(model, tokenizer, prompts, self.max_new_tokens, self.batch_size)
            ref.locality_generations.update(zip(prompts, texts))
        return ref

    def _teacher_forced(self, model, tokenizer, requests, ref, made) -> dict[str, torch.Tensor]:
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
        keys = list(pairs)
        if keys:
            nll, tokens = score_pairs(
                model, tokenizer, [k[0] for k in keys], [k[1] for k in keys], self.batch_size, with_argmax=want_tok, progress=True
            )
        else:
            nll, tokens = torch.zeros(0), []
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

    def _generation(self, model, tokenizer, requests, ref, made) -> dict[str, torch.Tensor]:
        prompts: dict[str, int] = {}
        for r in requests:
            for p in (r.prompt, *r.paraphrase_prompts, *(x.prompt for x in r.locality), *(x.prompt for x in r.portability)):
                prompts.setdefault(p, len(prompts))
        texts = greedy_generate(model, tokenizer, list(prompts), self.max_new_tokens, self.batch_size, progress=True)
        gen = dict(zip(prompts, texts))
        if made is not None:
            made.locality_generations.update({x.prompt: gen[x.prompt] for r in requests for x in r.locality})
        ems = {name: ExactMatch() for name in ("reliability", "generalization", "locality", "locality_agreement", "portability")}
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
        del ems["locality_agreement"]
        out = {f"gen_em/{k}": _quiet_compute(m) for k, m in ems.items()}
        out["gen_em/locality_agreement"] = _quiet_compute(agreement)
        return out

    # ------------------------------------------------------------------ Lightning hooks

    @staticmethod
    def _model_and_tokenizer(pl_module: "L.LightningModule") -> tuple[nn.Module, Any]:
        model = getattr(pl_module, "model", None)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if not isinstance(model, nn.Module) or tokenizer is None:
            raise AttributeError(
                f"EditEvaluation needs the LightningModule to expose `.model` (a causal LM) and `.tokenizer`; "
                f"{type(pl_module).__name__} does not"
            )
        return model, tokenizer

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        model, tokenizer = self._model_and_tokenizer(pl_module)
        self._requests = self._resolve_requests(trainer)
        if self._restored:  # resumed fit: the model is already partly edited, keep the unedited figures
            self._restored = False
            if self.reference is not None and self.reference.num_requests != len(self._requests):
                raise ValueError(
                    f"the checkpoint's 'before' evaluation covers {self.reference.num_requests} requests, "
                    f"this fit evaluates {len(self._requests)}: resume with the same data"
                )
            log.info("resuming: using the unedited-model evaluation stored in the checkpoint")
            return
        log.info("evaluating the unedited model on %d requests (%s)", len(self._requests), ", ".join(self.protocols))
        started = time.perf_counter()
        self.reference = None
        self.before = self._evaluate(model, tokenizer, self._requests, None, trainer.global_rank, trainer.world_size)
        self._seconds["before"] = time.perf_counter() - started

    def state_dict(self) -> dict[str, Any]:
        """The unedited model's figures and reference, so a resumed fit compares with them."""
        ref = self.reference
        return {
            "before": dict(self.before) if self.before is not None else None,
            "seconds_before": self._seconds.get("before"),
            "reference": None
            if ref is None
            else {
                "num_requests": ref.num_requests,
                "locality_argmax": [[prompt, answer, ids] for (prompt, answer), ids in ref.locality_argmax.items()],
                "locality_generations": dict(ref.locality_generations),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("before") is None:
            return
        self.before = dict(state_dict["before"])
        if state_dict.get("seconds_before") is not None:
            self._seconds["before"] = state_dict["seconds_before"]
        ref = state_dict.get("reference")
        self.reference = (
            None
            if ref is None
            else EvaluationReference(
                num_requests=ref["num_requests"],
                locality_argmax={(prompt, answer): ids for prompt, answer, ids in ref["locality_argmax"]},
                locality_generations=dict(ref["locality_generations"]),
            )
        )
        self._restored = True

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._immediate = {}  # immediate figures describe the last epoch

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.timing != "immediate":
            return
        if not isinstance(batch, list) or not all(isinstance(r, EditRequest) for r in batch):
            raise TypeError("immediate evaluation needs edit batches (lists of EditRequest)")
        protocols = [p for p in self.protocols if p in _PER_BATCH]
        if not protocols:
            return
        model, tokenizer = self._model_and_tokenizer(pl_module)
        saved, self.protocols = self.protocols, tuple(protocols)
        try:
            figures = self._evaluate(model, tokenizer, list(batch), self.reference, 0, 1, subset=True)
        finally:
            self.protocols = saved
        for name, value in figures.items():
            total, count = self._immediate.get(name, [0.0, 0.0])
            self._immediate[name] = [total + value * len(batch), count + len(batch)]

    def on_fit_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.before is None:
            raise RuntimeError("EditEvaluation.on_fit_end ran without the 'before' evaluation of on_fit_start")
        model, tokenizer = self._model_and_tokenizer(pl_module)
        started = time.perf_counter()
        if self.timing == "immediate":
            self.after = {name: total / count for name, (total, count) in self._immediate.items() if count}
            final = [p for p in self.protocols if p not in _PER_BATCH]
            if final:
                saved, self.protocols = self.protocols, tuple(final)
                try:
                    self.after.update(self._evaluate(model, tokenizer, self._requests, None, trainer.global_rank, trainer.world_size))
                finally:
                    self.protocols = saved
        else:
            log.info("evaluating the edited model on %d requests", len(self._requests))
            self.after = self._evaluate(model, tokenizer, self._requests, self.reference, trainer.global_rank, trainer.world_size)
        self._seconds["after"] = time.perf_counter() - started
        metrics = self.flat_metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if trainer.is_global_zero:
            directory = self.summary_dir or trainer.log_dir or os.getcwd()
            self.summary_path = self.write_summary(directory, model=pl_module)
            if self.print_table:
                print(self.table())

    # ------------------------------------------------------------------ reporting

    def figure_names(self) -> list[str]:
        """Figures present before or after, in protocol order."""
        names = list(self.before or {})
        names += [n for n in (self.after or {}) if n not in names]
        return names

    def flat_metrics(self) -> dict[str, float]:
        """``<figure>/before``, ``<figure>/after`` and ``<figure>/delta`` for the loggers."""
        out: dict[str, float] = {}
        for name in self.figure_names():
            b, a = (self.before or {}).get(name), (self.after or {}).get(name)
            if b is not None:
                out[f"{name}/before"] = b
            if a is not None:
                out[f"{name}/after"] = a
            if a is not None and b is not None:
                out[f"{name}/delta"] = a - b
        return out

    def summary(self, model: Any = None) -> dict[str, Any]:
        """The JSON-serializable record of the evaluation."""
        figures = {}
        for name in self.figure_names():
            protocol = _protocol_of(name)
            b, a = (self.before or {}).get(name), (self.after or {}).get(name)
            figures[name] = {
                "protocol": protocol,
                "protocol_description": self.protocol_description(protocol),
                "description": FIGURES.get(name, "perplexity of the model on the corpus"),
                "before": b,
                "after": a,
                "delta": a - b if a is not None and b is not None else None,
            }
        name = None
        inner = getattr(model, "model", model)
        if inner is not None:
            name = getattr(getattr(inner, "config", None), "name_or_path", None) or type(inner).__name__
        out: dict[str, Any] = {
            "evaluation_timing": self.timing,
            "evaluation_timing_description": TIMING[self.timing],
            "model": name,
            "editor": type(model).__name__ if model is not None else None,
            "num_requests": len(self._requests),
            "protocols": {p: self.protocol_description(p) for p in self.protocols},
            "seconds": dict(self._seconds),
            "figures": figures,
            "before": dict(self.before or {}),
            "after": dict(self.after or {}),
        }
        if "perplexity" in self.protocols:
            out["ppl_corpus_version"] = corpus_version(self.ppl_corpus, "heldout")
        return out

    @rank_zero_only
    def write_summary(self, directory: Union[str, os.PathLike], model: Any = None) -> Path:
        """Write ``summary.json`` into ``directory`` atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.summary(model), indent=2, ensure_ascii=False) + "\n"
        path = atomic_write(directory / "summary.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        log.info("wrote evaluation summary to %s", path)
        return path

    def table(self) -> str:
        """The ``metric | before | after | delta`` table as text."""
        rows = [("metric", "before", "after", "delta")]
        for name in self.figure_names():
            b, a = (self.before or {}).get(name), (self.after or {}).get(name)
            d = a - b if a is not None and b is not None else None
            rows.append((name, _fmt(b), _fmt(a), _fmt(d, sign=True)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        header = f"edit evaluation ({len(self._requests)} requests, timing: {self.timing})"
        return "\n".join([header, *lines])


def _lookup(table: dict, key: Any, protocol: str) -> Any:
    try:
        return table[key]
    except KeyError:
        raise ValueError(
            f"the reference has no {protocol} output for {key!r}: build it with the same requests and the "
            f"{protocol!r} protocol enabled"
        ) from None


def _protocol_of(name: str) -> str:
    prefix = name.split("/", 1)[0]
    return {"prob": "probability", "tok_acc": "token_accuracy", "gen_em": "generation", "ppl": "perplexity", "fluency": "fluency"}[prefix]


def _fmt(value: Optional[float], sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _mean_metric():
    from torchmetrics.aggregation import MeanMetric

    return MeanMetric(nan_strategy="error")


def _quiet_compute(metric) -> torch.Tensor:
    """``compute()`` without torchmetrics' warning for a metric that saw no data (gives NaN)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        value = metric.compute()
    return torch.as_tensor(value, dtype=torch.float64)
