"""Editing metrics as ``torchmetrics`` metrics: sums and counts, reduced by summing across processes.

- :class:`ProbabilityComparison`: the CounterFact probability metrics (×100): ES/EM on edit
  prompts, PS/PM on paraphrases, NS/NM on neighborhood (locality) prompts, and S, the harmonic
  mean of ES, PS and NS.
- :class:`TokenAccuracy`: teacher-forced fraction of target tokens that are the argmax.
- :class:`ExactMatch`: normalized string equality of generations and answers.
- :class:`Perplexity`: ``exp(sum NLL / token count)``.
- :class:`NextTokenKL`: mean and a high percentile of per-token KL divergences (the ``kl`` protocol).

Each metric's ``compute`` returns a tensor (a dict of tensors for
:class:`ProbabilityComparison`); fractions are in ``[0, 1]`` except the probability metrics,
which follow the papers' ×100 convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torchmetrics import Metric

from lit_edit.evaluation.scoring import normalize_answer

__all__ = ["ExactMatch", "NextTokenKL", "Perplexity", "ProbabilityComparison", "TokenAccuracy", "harmonic_mean"]

_F64 = torch.float64


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / Σ 1/v``: the score S of the CounterFact protocol and of the location sweep; 0 when
    any value is 0 or negative (the harmonic mean's limit), ``nan`` for no values."""
    values = [float(v) for v in values]
    if not values:
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _as_1d(values: Union[torch.Tensor, Sequence[float]], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=_F64, device=device).reshape(-1)


class ProbabilityComparison(Metric):
    """CounterFact probability comparison, from mean token NLLs (``P = exp(-nll)``).

    ``update(nll_new, nll_true, kind)`` with ``kind``:

    - ``"edit"``: edit prompts; ES = mean 1[P(new) > P(true)], EM = mean P(new) − P(true);
    - ``"paraphrase"``: paraphrases; PS / PM likewise;
    - ``"neighborhood"``: locality prompts, where ``nll_true`` scores the locality answer;
      NS = mean 1[P(true) > P(new)], NM = mean P(true) − P(new).

    ``compute()`` returns ``{"ES", "EM", "PS", "PM", "NS", "NM", "S"}`` ×100, leaving out the
    figures of kinds never updated; S is the harmonic mean of those of ES, PS, NS present.
    """

    KINDS = {"edit": ("ES", "EM"), "paraphrase": ("PS", "PM"), "neighborhood": ("NS", "NM")}
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for kind in self.KINDS:
            self.add_state(f"{kind}_success", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_margin", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_count", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, nll_new: Union[torch.Tensor, Sequence[float]], nll_true: Union[torch.Tensor, Sequence[float]], kind: str = "edit") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {list(self.KINDS)}")
        new = _as_1d(nll_new, self.device)
        true = _as_1d(nll_true, self.device)
        if new.shape != true.shape:
            raise ValueError(f"nll_new has {new.numel()} values, nll_true {true.numel()}")
        p_new, p_true = torch.exp(-new), torch.exp(-true)
        if kind == "neighborhood":  # the old answer should stay more likely than the edit target
            success, margin = (p_true > p_new), p_true - p_new
        else:
            success, margin = (p_new > p_true), p_new - p_true
        setattr(self, f"{kind}_success", getattr(self, f"{kind}_success") + success.to(_F64).sum())
        setattr(self, f"{kind}_margin", getattr(self, f"{kind}_margin") + margin.sum())
        setattr(self, f"{kind}_count", getattr(self, f"{kind}_count") + new.numel())

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for kind, (success_name, margin_name) in self.KINDS.items():
            count = getattr(self, f"{kind}_count")
            if count > 0:
                out[success_name] = 100.0 * getattr(self, f"{kind}_success") / count
                out[margin_name] = 100.0 * getattr(self, f"{kind}_margin") / count
        parts = [out[k] for k in ("ES", "PS", "NS") if k in out]
        if parts:
            out["S"] = torch.tensor(harmonic_mean(parts), dtype=_F64, device=parts[0].device)
        return out


class TokenAccuracy(Metric):
    """Teacher-forced token accuracy: the fraction of target tokens that are the argmax.

    ``update(predictions, targets)`` takes one pair of 1-D id tensors (or lists of pairs).
    ``average="example"`` (default, EasyEdit) averages each example's accuracy over examples;
    ``average="token"`` pools all tokens.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, average: str = "example", **kwargs):
        super().__init__(**kwargs)
        if average not in ("example", "token"):
            raise ValueError(f"average must be 'example' or 'token', got {average!r}")
        self.average = average
        self.add_state("example_sum", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("example_count", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("token_correct", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("token_count", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, predictions, targets) -> None:
        if isinstance(predictions, torch.Tensor) and predictions.dim() <= 1:
            predictions, targets = [predictions], [targets]
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for pred, target in zip(predictions, targets):
            pred = torch.as_tensor(pred).reshape(-1)
            target = torch.as_tensor(target).reshape(-1)
            if pred.shape != target.shape:
                raise ValueError(f"prediction has {pred.numel()} tokens, target {target.numel()}")
            if target.numel() == 0:
                continue
            correct = (pred.cpu() == target.cpu()).sum().item()
            self.example_sum += correct / target.numel()
            self.example_count += 1
            self.token_correct += correct
            self.token_count += target.numel()

    def compute(self) -> torch.Tensor:
        if self.average == "token":
            return self.token_correct / self.token_count
        return self.example_sum / self.example_count


class ExactMatch(Metric):
    """Fraction of predictions equal to their reference after :func:`normalize_answer`.

    A reference may be a string or a sequence of acceptable strings.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[Union[str, Sequence[str]]]) -> None:
        if isinstance(predictions, str):
            predictions, references = [predictions], [references]
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        for pred, ref in zip(predictions, references):
            options = [ref] if isinstance(ref, str) else list(ref)
            norm = normalize_answer(pred)
            self.hits += float(any(norm == normalize_answer(o) for o in options))
            self.count += 1

    def compute(self) -> torch.Tensor:
        return self.hits / self.count


class Perplexity(Metric):
    """``exp(sum of token NLLs / number of tokens)``, from per-batch sums and counts."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("token_count", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, nll_sum: Union[float, torch.Tensor], token_count: Union[int, torch.Tensor]) -> None:
        self.nll_sum += torch.as_tensor(nll_sum, dtype=_F64, device=self.device).sum()
        self.token_count += torch.as_tensor(token_count, dtype=_F64, device=self.device).sum()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.token_count)


class NextTokenKL(Metric):
    """Per-token KL divergences (``KL(P_unedited ‖ P_edited)`` of the ``kl`` protocol, in nats).

    ``update(values)`` adds one value per predicted token; ``compute()`` returns
    ``{"mean": token-weighted mean, "p<q>": the q-th percentile}`` (``q`` = ``percentile``, 95 by
    default; linear interpolation). The values themselves are the state (concatenated across
    processes), so the percentile is that of every process's tokens.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, percentile: float = 95.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Union[torch.Tensor, Sequence[float]]) -> None:
        self.values.append(_as_1d(values, self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        values = self.values
        if isinstance(values, list):
            values = torch.cat(values) if values else torch.zeros(0, dtype=_F64, device=self.device)
        name = f"p{self.percentile:g}"
        if values.numel() == 0:
            nan = torch.tensor(float("nan"), dtype=_F64, device=self.device)
            return {"mean": nan, name: nan}
        return {"mean": values.mean(), name: torch.quantile(values, self.percentile / 100.0)}
