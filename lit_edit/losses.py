"""Plain-torch losses of the fine-tuning editors: the edit loss and the preservation term.

* :func:`ft_loss` — per-request loss of a batch of edit requests: ``ft_m`` (teacher-forced
  cross-entropy on the target tokens only, prompt and padding masked, mean over each sample's
  target tokens) or ``ft_l`` (the old ROME baseline: every target token scored at the last
  prompt position). EOS may be appended to every target; the LM head runs only at the positions
  the loss reads.
* :class:`PreservationTerm` / :func:`preservation_loss` — the preservation objective of the
  locate-and-edit methods applied to a fine-tuned linear weight ``W`` (original ``W₀``): the
  relative squared change of its output on generic-text keys ``k``,

      E_k ‖(W − W₀) k‖² / E_k ‖W₀ k‖²  =  tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ),   C = E[k kᵀ].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_edit.data.request import EditRequest
from lit_edit.data.tokenize import IGNORE_INDEX, encode_pairs
from lit_edit.models import logits_at

__all__ = ["PreservationTerm", "ft_loss", "preservation_loss"]


def ft_loss(
    model: nn.Module,
    tokenizer: Any,
    requests: list[EditRequest],
    kind: str = "ft_m",
    append_eos: bool = True,
) -> torch.Tensor:
    """Per-request loss, shape ``(B,)``: FT-M (target tokens teacher forced) or FT-L."""
    device = next(model.parameters()).device
    enc = encode_pairs(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], append_eos)
    input_ids = enc["input_ids"].to(device)
    attn = enc["attention_mask"].to(device)
    labels = enc["labels"].to(device)
    if kind == "ft_m":
        # logits at t-1 predict the target token at t; only those rows go through the LM head
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        logits = logits_at(model, input_ids, attn, predicts)
        nll = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][predicts[:, :-1]], reduction="none")
        rows = predicts.nonzero(as_tuple=True)[0]
        per_row = torch.zeros(len(requests), dtype=nll.dtype, device=device).index_add(0, rows, nll)
        return per_row / predicts.sum(1).clamp_min(1)
    if kind == "ft_l":
        last = enc["prompt_lengths"].to(device) - 1
        at_last = torch.zeros_like(labels, dtype=torch.bool)
        at_last[torch.arange(len(requests), device=device), last] = True
        prompt_logits = logits_at(model, input_ids, attn, at_last).float().log_softmax(-1)  # (B, V)
        mask = labels != IGNORE_INDEX
        nll = -prompt_logits.gather(1, labels.clamp_min(0)) * mask
        return nll.sum(1) / mask.sum(1).clamp_min(1)
    raise ValueError(f"unknown loss {kind!r}; use 'ft_m' or 'ft_l'")


@dataclass(frozen=True)
class PreservationTerm:
    """What the preservation penalty of one weight needs: ``C``, ``W₀`` as ``(out, in)`` and the
    normaliser ``tr(W₀ C W₀ᵀ)``, all float32 on the weight's device."""

    mom2: torch.Tensor
    original: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def build(cls, mom2: torch.Tensor, original: torch.Tensor) -> PreservationTerm:
        """From the key second moment ``C`` (``in × in``) and ``W₀`` (``out × in``)."""
        c = mom2.to(device=original.device, dtype=torch.float32)
        w0 = original.to(torch.float32)
        return cls(mom2=c, original=w0, scale=((w0 @ c) * w0).sum())

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """``tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ)`` for the current ``weight`` (``out × in``)."""
        delta = weight.float() - self.original
        return ((delta @ self.mom2) * delta).sum() / self.scale


def preservation_loss(terms: Mapping[str, PreservationTerm], weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of each named term on the weight of the same name (``out × in``)."""
    total = None
    for name, term in terms.items():
        value = term(weights[name])
        total = value if total is None else total + value
    return total
