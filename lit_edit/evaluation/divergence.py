"""KL divergence of next-token distributions from the unedited model's: the maths of the ``kl`` protocol.

The ``kl`` protocol measures how far an edit moved the model's predictions on held-out text:
for every predicted position t of the texts, ``KL(P_t ‖ Q_t)`` with ``P_t`` the unedited
model's next-token distribution and ``Q_t`` the edited model's. Perplexity can stay put while
the distributions move (probability moves between wrong tokens, or from the observed token's
rivals to others); this figure sees that drift.

Storing ``P_t`` over the whole vocabulary for every position is too large (texts × tokens ×
vocabulary floats), so the unedited model's distribution is kept as a :class:`TopKDistribution`:
at each position the ids and log-probabilities of its ``k`` most likely tokens ``S_t`` and the
log of the remaining mass ``P_t(T_t)`` of the tail ``T_t = V \\ S_t``. The figure is the KL of
the **partition** ``{ {i} : i ∈ S_t } ∪ { T_t }``:

    KL_k(P_t ‖ Q_t) = Σ_{i ∈ S_t} P_t(i) log(P_t(i) / Q_t(i)) + P_t(T_t) log(P_t(T_t) / Q_t(T_t))

where ``Q_t(T_t)`` is the edited model's total probability of the same tail tokens. Merging the
tail's tokens into one outcome can only lose information (the log-sum inequality, i.e. the data
processing inequality for KL), so

    0 ≤ KL_k(P_t ‖ Q_t) ≤ KL(P_t ‖ Q_t),

with equality when ``k`` covers the vocabulary (the tail is empty and its term is 0), and more
generally exactly when ``Q_t / P_t`` is constant on the tail (the edit rescaled the tail tokens
uniformly). The gap is ``P_t(T_t) · KL(P_t(·|T_t) ‖ Q_t(·|T_t))``: the tail's mass times the
divergence of the tail's shapes, so it is small when the top ``k`` tokens hold almost all of
``P_t``. ``k`` therefore buys exactness with storage: ``texts × tokens × k × 8`` bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_edit.data.tokenize import pad_rows
from lit_edit.models import eval_mode, model_device

__all__ = [
    "TopKDistribution",
    "decode_tensor",
    "encode_tensor",
    "full_kl",
    "next_token_logprobs",
    "partition_kl",
    "text_rows",
    "top_k_distribution",
]


@dataclass
class TopKDistribution:
    """One text's unedited next-token distributions, kept as their top ``k`` tokens plus the tail mass.

    Row ``t`` describes the prediction of token ``t + 1`` of the text from tokens ``0..t``.
    """

    ids: torch.Tensor
    """``(positions, k)`` int32: the ``k`` most likely token ids at each position."""
    logprobs: torch.Tensor
    """``(positions, k)`` float32: their log-probabilities."""
    tail: torch.Tensor
    """``(positions,)`` float32: log of the probability of every other token (``-inf`` when none)."""

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def positions(self) -> int:
        return int(self.ids.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable form (the tensors' raw bytes in base64)."""
        return {"ids": encode_tensor(self.ids), "logprobs": encode_tensor(self.logprobs), "tail": encode_tensor(self.tail)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TopKDistribution:
        out = cls(decode_tensor(state["ids"]), decode_tensor(state["logprobs"]), decode_tensor(state["tail"]))
        n, k = out.ids.shape if out.ids.dim() == 2 else (-1, -1)
        if out.ids.dim() != 2 or tuple(out.logprobs.shape) != (n, k) or tuple(out.tail.shape) != (n,):
            raise ValueError(f"inconsistent top-k shapes {tuple(out.ids.shape)}, {tuple(out.logprobs.shape)}, {tuple(out.tail.shape)}")
        return out


_DTYPES = {"int32": torch.int32, "float32": torch.float32}


def encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` with the raw little-endian bytes of an int32 / float32 tensor in base64."""
    name = str(tensor.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise TypeError(f"encode_tensor stores int32 or float32 tensors, got {tensor.dtype}")
    raw = tensor.detach().cpu().contiguous().numpy().astype(f"<{'i4' if name == 'int32' else 'f4'}", copy=False).tobytes()
    return {"dtype": name, "shape": list(tensor.shape), "data": base64.b64encode(raw).decode("ascii")}


def decode_tensor(state: dict[str, Any]) -> torch.Tensor:
    """The tensor :func:`encode_tensor` stored (a ``ValueError`` for a malformed entry)."""
    import numpy as np

    name, shape = state["dtype"], [int(s) for s in state["shape"]]
    if name not in _DTYPES:
        raise ValueError(f"unknown stored dtype {name!r}")
    array = np.frombuffer(base64.b64decode(state["data"], validate=True), dtype="<i4" if name == "int32" else "<f4")
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"stored tensor has {array.size} values, its shape {shape} needs {int(np.prod(shape))}")
    return torch.from_numpy(array.copy()).reshape(shape)


def top_k_distribution(logprobs: torch.Tensor, k: int) -> TopKDistribution:
    """The top-``k`` summary of ``(positions, vocabulary)`` log-probabilities (``k`` capped at the vocabulary)."""
    k = min(int(k), logprobs.shape[-1])
    values, ids = torch.topk(logprobs, k, dim=-1)
    tail = _tail_logmass(logprobs, ids)
    return TopKDistribution(ids.to(torch.int32).cpu(), values.float().cpu(), tail.float().cpu())


def _tail_logmass(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{i ∉ ids[t]} exp(logprobs[t, i]) per row, summed directly (no 1 − Σ top-k cancellation)."""
    if ids.shape[-1] >= logprobs.shape[-1]:
        return torch.full(logprobs.shape[:-1], float("-inf"), dtype=torch.float64, device=logprobs.device)
    rest = logprobs.double().scatter(-1, ids.long(), float("-inf"))
    return torch.logsumexp(rest, dim=-1)


def partition_kl(reference: TopKDistribution, logprobs: torch.Tensor) -> torch.Tensor:
    """``KL_k(P_t ‖ Q_t)`` per position (float64, ``(positions,)``): the KL of the partition
    {each of the reference's top-k tokens, the rest} (module docstring), ``P`` from ``reference``,
    ``Q`` from the edited model's ``(positions, vocabulary)`` log-probabilities ``logprobs``.
    Rounding can make a term a hair below 0; each position's value is clamped at 0."""
    if logprobs.shape[0] != reference.positions:
        raise ValueError(f"the reference holds {reference.positions} positions, the text now has {logprobs.shape[0]}")
    ids = reference.ids.long().to(logprobs.device)
    lp = reference.logprobs.double().to(logprobs.device)
    lq = logprobs.double().gather(-1, ids)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    p_tail = reference.tail.double().to(logprobs.device)
    q_tail = _tail_logmass(logprobs, ids).float().double()  # rounded as the stored P tail is: identical models give 0
    tail_term = torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
    return (kl + tail_term).clamp_min(0.0).cpu()


def full_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(P_t ‖ Q_t)`` per row over the whole vocabulary (float64), from log-probabilities."""
    p, q = p_logprobs.double(), q_logprobs.double()
    return (p.exp() * (p - q)).sum(-1)


def text_rows(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text's token ids, with the tokenizer's special tokens, truncated to ``max_length``
    (as the perplexity protocol reads them); a text of one token predicts nothing (empty row kept
    as is)."""
    return [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    batch_size: int = 8,
    max_batch_tokens: int = 2048,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(row index, (len(row) - 1, vocabulary) float32 log-probabilities)`` of every row of at
    least two tokens, in an order of its choosing (rows batched by length, at most ``batch_size``
    per forward and, beyond the first, ``max_batch_tokens`` padded tokens)."""
    order = sorted((i for i, r in enumerate(rows) if len(r) >= 2), key=lambda i: len(rows[i]))
    groups: list[list[int]] = []
    for i in order:  # ascending: the newest row is the widest of its group
        if groups and len(groups[-1]) < batch_size and (len(groups[-1]) + 1) * len(rows[i]) <= max_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with eval_mode(model):
        for group in groups:
            ids, mask = pad_rows([rows[i] for i in group], pad)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            logits = out.logits if hasattr(out, "logits") else out[0]
            for j, i in enumerate(group):
                n = len(rows[i])
                yield i, torch.log_softmax(logits[j, : n - 1].float(), dim=-1)
