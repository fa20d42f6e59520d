"""``EditEvaluation``: the evaluation engine run from Lightning's hooks, before and after ``fit``.

At ``on_fit_start`` the unedited model is scored ("before"); at ``on_fit_end`` every request is
scored again on the final model ("after": *after-all* timing, retention), or, with ``immediate``
timing, each edit batch (a LocFT-BF round) is scored right after its edit. Figures go to the trainer's loggers as
``<figure>/before|after|delta``, to ``summary.json`` and to a printed table
(:mod:`lit_edit.evaluation.report`). The scoring itself is :class:`~lit_edit.evaluation.Evaluator`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lit_edit.data.chat import PromptFormat, prompt_format
from lit_edit.data.corpus import corpus_version
from lit_edit.data.request import EditRequest
from lit_edit.distributed import gather_objects
from lit_edit.evaluation import report
from lit_edit.evaluation.evaluator import EvaluationReference, Evaluator, UneditedCache, as_requests
from lit_edit.evaluation.harness import HarnessOptions
from lit_edit.evaluation.protocols import PER_BATCH, check_timing

#: Protocols that feed the requests' prompts to the model (perplexity reads raw text).
PROMPT_PROTOCOLS = ("probability", "token_accuracy", "generation", "fluency")

log = logging.getLogger(__name__)

__all__ = ["EditEvaluation", "module_model_and_tokenizer"]


def module_model_and_tokenizer(pl_module: L.LightningModule, who: str) -> tuple[nn.Module, Any]:
    """The ``.model`` (a causal LM) and ``.tokenizer`` an evaluation callback reads from the
    LightningModule; an error naming the callback ``who`` if the module has none."""
    model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
    if not isinstance(model, nn.Module) or tokenizer is None:
        raise AttributeError(
            f"{who} needs the LightningModule to expose `.model` (a causal LM) and `.tokenizer`; "
            f"{type(pl_module).__name__} does not"
        )
    return model, tokenizer


class EditEvaluation(L.Callback):
    """Evaluate the edited model before and after ``fit``; log, save and print the figures.

    Args:
        protocols: any of ``probability``, ``token_accuracy``, ``generation``, ``perplexity``,
            ``kl`` (opt-in: next-token KL from the unedited model on held-out text) and ``fluency``
            (opt-in: 64-token generations from the edit prompts).
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
            ``accumulate=False`` restores the weights: single / batched editing; a LocFT-BF
            round is scored when it ends). ``--editing.strategy`` sets it (:mod:`lit_edit.strategy`);
            the summary and the table name the strategy, batch size, editor, model and data.
        cache_unedited: keep the unedited model's figures on disk (``<cache root>/unedited``),
            keyed by its weights, the requests and these settings, so a second run skips them.
        harness: the lm-evaluation-harness tasks of the ``harness`` protocol (``tasks``,
            ``include``, ``limit``, ``num_fewshot``; :class:`~lit_edit.evaluation.harness.HarnessOptions`);
            needs ``pip install lit-edit[lmeval]``.
        kl_texts, kl_top_k: the ``kl`` protocol's number of held-out texts and tokens kept per
            position of the unedited distribution (:class:`~lit_edit.evaluation.Evaluator`).

    Prompts are fed in the format the module's tokenizer carries (the editor's
    ``chat_template``, :mod:`lit_edit.data.chat`; raw text for a tokenizer without one); the
    format is recorded in the summary (``chat_template``) and in the descriptions of the
    prompt-based protocols, and a fit resumed from a checkpoint must use the same one.
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
        cache_unedited: bool = True,
        harness: Optional[HarnessOptions] = None,
        kl_texts: int = 20,
        kl_top_k: int = 256,
    ):
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.evaluator = Evaluator(protocols, batch_size, max_new_tokens, ppl_corpus, ppl_texts, ppl_max_length, harness=harness,
                                   kl_texts=kl_texts, kl_top_k=kl_top_k)
        self.timing = check_timing(timing)
        self.requests, self.limit = requests, limit
        self.summary_dir, self.print_table, self.cache_unedited = summary_dir, print_table, cache_unedited
        self.reference: Optional[EvaluationReference] = None
        self.before: Optional[dict[str, float]] = None
        self.after: Optional[dict[str, float]] = None
        self.summary_path: Optional[Path] = None
        self._requests: list[EditRequest] = []
        self._immediate: dict[str, list[float]] = {}
        self._seconds: dict[str, float] = {}
        self._restored = False
        self._run: dict[str, Any] = {}
        self.prompt_format: PromptFormat = prompt_format(None)
        self._stored_format: Optional[dict[str, Any]] = None

    def _resolve_requests(self, trainer: Optional[L.Trainer]) -> list[EditRequest]:
        requests: Any = self.requests
        if requests is None and trainer is not None:
            requests = getattr(getattr(trainer, "datamodule", None), "eval_requests", None)
        if requests is None and self.evaluator.needs_requests:
            raise ValueError("EditEvaluation has no requests: pass `requests=` or use a datamodule with `eval_requests`")
        requests = as_requests(requests() if callable(requests) else requests)
        return requests[: self.limit] if self.limit is not None else requests

    @staticmethod
    def _model_and_tokenizer(pl_module: L.LightningModule) -> tuple[nn.Module, Any]:
        return module_model_and_tokenizer(pl_module, "EditEvaluation")

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, tokenizer = self._model_and_tokenizer(pl_module)
        self._requests = self._resolve_requests(trainer)
        self.prompt_format = prompt_format(tokenizer)
        self._run = dict(getattr(pl_module, "run_record", None) or {})  # editor, strategy, model, data of this fit
        if self._restored:  # resumed fit: the model is already partly edited, keep the unedited figures
            self._restored = False
            stored = self._stored_format
            if stored is not None and stored != self.prompt_format.describe():
                raise ValueError(
                    f"the checkpoint's 'before' evaluation fed prompts as {stored}, this fit as "
                    f"{self.prompt_format.describe()}: resume with the same chat_template"
                )
            if self.reference is not None and self.reference.num_requests != len(self._requests):
                raise ValueError(
                    f"the checkpoint's 'before' evaluation covers {self.reference.num_requests} requests, "
                    f"this fit evaluates {len(self._requests)}: resume with the same data"
                )
            log.info("resuming: using the unedited-model evaluation stored in the checkpoint")
            return
        self._immediate = {}
        log.info("evaluating the unedited model on %d requests (%s)", len(self._requests), ", ".join(self.evaluator.protocols))
        share = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        cache = UneditedCache() if self.cache_unedited else None
        result = UneditedCache.evaluate(cache, self.evaluator, model, tokenizer, self._requests, **share)
        self.before, self.reference, self._seconds["before"] = result.figures, result.reference, result.seconds
        if trainer.world_size > 1:  # every process keeps the whole reference (a checkpoint of any rank resumes all)
            self.reference = result.reference.merged(gather_objects(result.reference))

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module, "edits_in_rounds", False):
            self._immediate = {}  # immediate figures describe the last epoch

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(pl_module, "edits_in_rounds", False):
            return  # a mini-batch of a LocFT-BF round, not an edit: the round is scored when it ends (on_edits_applied)
        self._score_immediately(pl_module, batch)

    def on_edits_applied(self, trainer: L.Trainer, pl_module: L.LightningModule, requests: list[EditRequest]) -> None:
        """An editor in rounds (LocFT-BF) finished one (:meth:`~lit_edit.editors.base.Editor.edits_applied`):
        under ``immediate`` timing its requests are scored now, before the editor keeps or undoes the round."""
        self._score_immediately(pl_module, requests)

    def _score_immediately(self, pl_module: L.LightningModule, batch: Any) -> None:
        protocols = [p for p in self.evaluator.protocols if p in PER_BATCH]
        if self.timing != "immediate" or not protocols:
            return
        if not isinstance(batch, list) or not all(isinstance(r, EditRequest) for r in batch):
            raise TypeError("immediate evaluation needs edit batches (lists of EditRequest)")
        model, tokenizer = self._model_and_tokenizer(pl_module)
        figures = self.evaluator.with_protocols(protocols).evaluate(model, tokenizer, batch, self.reference, partial=True).figures
        for name, value in figures.items():
            total, count = self._immediate.get(name, [0.0, 0.0])
            self._immediate[name] = [total + value * len(batch), count + len(batch)]

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None:
            raise RuntimeError("EditEvaluation.on_fit_end ran without the 'before' evaluation of on_fit_start")
        model, tokenizer = self._model_and_tokenizer(pl_module)
        started = time.perf_counter()
        shares = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        if self.timing == "immediate":
            self.after = {name: total / count for name, (total, count) in self._immediate.items() if count}
            final = [p for p in self.evaluator.protocols if p not in PER_BATCH]
            if final:
                final_eval = self.evaluator.with_protocols(final)  # kl compares with the unedited reference
                self.after.update(final_eval.evaluate(model, tokenizer, self._requests, self.reference, **shares).figures)
        else:
            log.info("evaluating the edited model on %d requests", len(self._requests))
            self.after = self.evaluator.evaluate(model, tokenizer, self._requests, self.reference, **shares).figures
        self._seconds["after"] = time.perf_counter() - started
        for logger in trainer.loggers:
            logger.log_metrics(report.flat_metrics(self.before, self.after), step=trainer.global_step)
            logger.save()
        directory = self.summary_dir or trainer.log_dir or os.getcwd()  # log_dir is a collective under DDP
        if trainer.is_global_zero:
            self.summary_path = self.write_summary(directory, model=pl_module)
            if self.print_table:
                print(self.table())

    # ------------------------------------------------------------------ checkpoint state

    @override
    def state_dict(self) -> dict[str, Any]:
        """The unedited model's figures and reference, so a resumed fit compares with them."""
        return {
            "before": dict(self.before) if self.before is not None else None,
            "seconds_before": self._seconds.get("before"),
            "reference": None if self.reference is None else self.reference.state_dict(),
            "chat_template": self.prompt_format.describe(),
            "immediate": {name: list(v) for name, v in self._immediate.items()},  # the batches / rounds scored so far
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("before") is None:
            return
        self._immediate = {name: list(v) for name, v in (state_dict.get("immediate") or {}).items()}
        self.before = dict(state_dict["before"])
        if state_dict.get("seconds_before") is not None:
            self._seconds["before"] = state_dict["seconds_before"]
        ref = state_dict.get("reference")
        self.reference = None if ref is None else EvaluationReference.from_state_dict(ref)
        self._stored_format = state_dict.get("chat_template")
        self._restored = True

    # ------------------------------------------------------------------ reporting (lit_edit.evaluation.report)

    def summary(self, model: Any = None) -> dict[str, Any]:
        """The JSON-serializable record of this evaluation."""
        extra = {}
        if "perplexity" in self.evaluator.protocols or "kl" in self.evaluator.protocols:
            extra["ppl_corpus_version"] = corpus_version(self.evaluator.ppl_corpus, "heldout")
        run = dict(getattr(model, "run_record", None) or self._run or {})
        return report.summary(
            self.before, self.after, protocols=self.descriptions(), timing=self.timing, run=run,
            num_requests=len(self._requests), model=model, seconds=self._seconds, extra=extra,
            chat_template=self.prompt_format.describe(),
        )

    def descriptions(self) -> dict[str, str]:
        """``{protocol: description}``, the prompt-based ones stating how prompts were fed."""
        label = self.prompt_format.label()
        return {p: f"{d} [{label}]" if p in PROMPT_PROTOCOLS else d for p, d in self.evaluator.descriptions().items()}

    @rank_zero_only
    def write_summary(self, directory: Union[str, os.PathLike], model: Any = None) -> Path:
        """Write ``summary.json`` into ``directory`` atomically; returns its path."""
        return report.write_summary(directory, self.summary(model))

    def table(self) -> str:
        """The ``metric | before | after | delta`` table as text."""
        header = report.header(len(self._requests), self.timing, self.prompt_format.mode, self._run)
        return report.table(self.before, self.after, header)

