"""Evaluation of edits.

- :mod:`~lit_edit.evaluation.evaluator`: the engine, :class:`Evaluator` / :func:`evaluate`, usable
  without a Trainer;
- :mod:`~lit_edit.evaluation.protocols`: protocol, figure and timing descriptions;
- :mod:`~lit_edit.evaluation.report`: flat metrics, summary JSON and the before → after table;
- :mod:`~lit_edit.evaluation.callback`: :class:`EditEvaluation`, the engine run from Lightning hooks;
- :mod:`~lit_edit.evaluation.retention`: :class:`RetentionCurve`, figures of a sequential run every
  ``every`` committed edits (CSV, plot, resumable);
- :mod:`~lit_edit.evaluation.harness`: the ``harness`` protocol (lm-evaluation-harness tasks,
  :class:`HarnessOptions`; optional extra ``lmeval``);
- :mod:`~lit_edit.evaluation.metrics` and :mod:`~lit_edit.evaluation.scoring`: torchmetrics
  metrics and the scoring primitives.
"""

from lit_edit.evaluation.callback import EditEvaluation
from lit_edit.evaluation.evaluator import Evaluation, EvaluationReference, Evaluator, UneditedCache, evaluate
from lit_edit.evaluation.harness import HarnessOptions
from lit_edit.evaluation.metrics import ExactMatch, Perplexity, ProbabilityComparison, TokenAccuracy
from lit_edit.evaluation.protocols import FIGURES, PROTOCOLS, TIMING
from lit_edit.evaluation.retention import RetentionCurve
from lit_edit.evaluation.scoring import (
    STOP_STRINGS,
    StopOnStrings,
    continuation_nll,
    greedy_generate,
    ngram_entropy,
    normalize_answer,
    perplexity,
    score_pairs,
    teacher_forced_argmax,
    text_nll,
    truncate_at_stop,
)

__all__ = [
    "FIGURES",
    "PROTOCOLS",
    "STOP_STRINGS",
    "TIMING",
    "EditEvaluation",
    "Evaluation",
    "EvaluationReference",
    "Evaluator",
    "ExactMatch",
    "HarnessOptions",
    "Perplexity",
    "ProbabilityComparison",
    "RetentionCurve",
    "StopOnStrings",
    "TokenAccuracy",
    "UneditedCache",
    "continuation_nll",
    "evaluate",
    "greedy_generate",
    "ngram_entropy",
    "normalize_answer",
    "perplexity",
    "score_pairs",
    "teacher_forced_argmax",
    "text_nll",
    "truncate_at_stop",
]
