"""Plain-torch losses of the fine-tuning editors: the edit loss and the preservation term.

* :func:`ft_loss` — per-request loss of a batch of edit requests: ``ft_m`` (teacher-forced
  cross-entropy on the target tokens only, prompt and padding masked, mean over each sample's
  target tokens) or ``ft_l`` (the old ROME baseline: every target token scored at the last
  prompt position). EOS may be appended to every target; the LM head runs only at the positions
  the loss reads.
* :class:`BlockInputCache` — the hidden states entering the lowest tuned block, per request.
  While only that block and those above it are trained, the blocks below see the same inputs
  at every step; :func:`ft_loss` given a cache records those states the first time it sees a
  request (ordinary full forward) and afterwards runs the forward and backward from that block
  up only.
* :class:`PreservationTerm` / :func:`preservation_loss` — the preservation objective of the
  locate-and-edit methods applied to a fine-tuned linear weight ``W`` (original ``W₀``): the
  relative squared change of its output on generic-text keys ``k``,

      E_k ‖(W − W₀) k‖² / E_k ‖W₀ k‖²  =  tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ),   C = E[k kᵀ].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lit_edit.data.request import EditRequest
from lit_edit.data.tokenize import IGNORE_INDEX, encode_pairs
from lit_edit.models import logits_at

__all__ = ["BlockInputCache", "PreservationTerm", "ft_loss", "group_overhead", "length_groups", "preservation_loss"]


def ft_loss(
    model: nn.Module,
    tokenizer: Any,
    requests: list[EditRequest],
    kind: str = "ft_m",
    append_eos: bool = True,
    block_inputs: Optional[BlockInputCache] = None,
    group_by_length: bool = False,
    write_spans: Optional[Sequence[Optional[Sequence[tuple[int, Optional[int]]]]]] = None,
    write_modules: Sequence[nn.Module] = (),
) -> torch.Tensor:
    """Per-request loss, shape ``(B,)``: FT-M (target tokens teacher forced) or FT-L.

    With ``block_inputs`` (a :class:`BlockInputCache` of this model), a batch whose requests
    were all seen before runs from the cached block up; any other batch runs the whole model
    and fills the cache. With ``group_by_length``, the batch runs as a few sub-batches of rows
    of similar length (:func:`length_groups`) instead of one batch padded to its longest row;
    each row's loss does not depend on the rest of its batch (right padding, its own positions),
    so the losses are the same either way, up to float rounding, and one backward through their
    mean gives the gradient of the whole batch.

    ``write_spans`` (per request a few ``[start, end)`` token ranges of its row, ``end`` ``None``
    for the row's end, or ``None`` for every position) with ``write_modules`` restricts where the
    edit is written: the forward pass is unchanged, but the outputs of ``write_modules`` outside
    each row's ranges are cut from the backward pass, so the gradient of those modules' weights
    comes from those positions only
    (e.g. the subject's tokens: the edit then reaches the answer through what the model reads
    from the subject, as the locate-and-edit methods write it, not through the question's words
    that every subject asked the same question shares).
    """
    if kind not in ("ft_m", "ft_l"):
        raise ValueError(f"unknown loss {kind!r}; use 'ft_m' or 'ft_l'")
    device = next(model.parameters()).device
    enc = encode_pairs(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], append_eos)
    if write_spans is not None:
        if len(write_spans) != len(requests):
            raise ValueError(f"{len(write_spans)} write spans for {len(requests)} requests")
        keep = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
        for b, spans in enumerate(write_spans):
            if spans is None:
                keep[b] = True
                continue
            for start, end in spans:
                keep[b, start:end] = True
        enc["write"] = keep
    lengths = enc["attention_mask"].sum(1).tolist()
    groups = length_groups(lengths, group_overhead(device)) if group_by_length else [list(range(len(requests)))]
    if len(groups) == 1:
        return _rows_loss(model, enc, kind, block_inputs, device, write_modules)
    out = None
    for rows in groups:
        index = torch.tensor(rows, dtype=torch.long)
        width = max(lengths[i] for i in rows)
        part = {k: (v[index, :width] if v.dim() == 2 else v[index]) for k, v in enc.items()}
        loss = _rows_loss(model, part, kind, block_inputs, device, write_modules)
        out = loss.new_zeros(len(requests)) if out is None else out
        out = out.index_copy(0, index.to(device), loss)
    return out


def group_overhead(device: torch.device) -> int:
    """The fixed cost of one more sub-batch, in tokens, for :func:`length_groups` and
    :func:`lit_edit.closed_form.values.span_groups`: on a CPU about 32 tokens' work (measured on
    SmolLM2-135M); on an accelerator one more forward and backward is dominated by kernel launches,
    worth a few hundred tokens of a small model's work, so 512 there (fewer, larger sub-batches)."""
    return 32 if torch.device(device).type == "cpu" else 512


def length_groups(lengths: list[int], overhead: int = 32) -> list[list[int]]:
    """Row indices split into sub-batches of similar length, cheapest first.

    Chooses, over the rows sorted by length, the split that minimises the padded tokens the
    sub-batches run (rows × longest row, summed) plus ``overhead`` tokens per sub-batch (the
    fixed cost of one more forward and backward): a dynamic programme over the distinct
    lengths. One group when the lengths are all alike.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    values = sorted(set(lengths))
    counts = [sum(1 for n in lengths if n == v) for v in values]
    best = [0.0] + [float("inf")] * len(values)
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):  # best[j]: cost of the rows with the j shortest lengths
        rows = 0
        for i in range(j, 0, -1):  # last group: lengths values[i-1 .. j-1]
            rows += counts[i - 1]
            cost = best[i - 1] + rows * values[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], len(values)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups, start = [], 0
    for lo, hi in reversed(bounds):
        size = sum(counts[lo:hi])
        groups.append(order[start:start + size])
        start += size
    return groups


def _rows_loss(
    model: nn.Module, enc: dict[str, torch.Tensor], kind: str, block_inputs: Optional[BlockInputCache], device,
    write_modules: Sequence[nn.Module] = (),
) -> torch.Tensor:
    """:func:`ft_loss` of one right-padded batch (the output of ``encode_pairs``)."""
    if "write" in enc and write_modules:
        with _write_only(write_modules, enc["write"].to(device)):
            return _rows_loss(model, {k: v for k, v in enc.items() if k != "write"}, kind, block_inputs, device)
    input_ids = enc["input_ids"].to(device)
    attn = enc["attention_mask"].to(device)
    labels = enc["labels"].to(device)
    n = input_ids.shape[0]
    context = block_inputs.forward(input_ids, attn) if block_inputs is not None else nullcontext()
    if kind == "ft_m":
        # logits at t-1 predict the target token at t; only those rows go through the LM head
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        with context:
            logits = logits_at(model, input_ids, attn, predicts)
        nll = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][predicts[:, :-1]], reduction="none")
        rows = predicts.nonzero(as_tuple=True)[0]
        per_row = torch.zeros(n, dtype=nll.dtype, device=device).index_add(0, rows, nll)
        return per_row / predicts.sum(1).clamp_min(1)
    last = enc["prompt_lengths"].to(device) - 1
    at_last = torch.zeros_like(labels, dtype=torch.bool)
    at_last[torch.arange(n, device=device), last] = True
    with context:
        prompt_logits = logits_at(model, input_ids, attn, at_last).float().log_softmax(-1)  # (B, V)
    mask = labels != IGNORE_INDEX
    nll = -prompt_logits.gather(1, labels.clamp_min(0)) * mask
    return nll.sum(1) / mask.sum(1).clamp_min(1)


@contextmanager
def _write_only(modules: Sequence[nn.Module], keep: torch.Tensor) -> Iterator[None]:
    """Cut ``modules``' outputs at the positions where ``keep`` (``(B, T)``) is false from the
    backward pass; their values are unchanged."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 3 or out.shape[:2] != keep.shape[:2]:
            raise RuntimeError(f"write positions of shape {tuple(keep.shape)} do not fit an output of shape {tuple(out.shape)}")
        return torch.where(keep[..., None], out, out.detach())

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Skip(nn.Module):
    """Stands in for a frozen block whose output is replaced anyway: returns its input."""

    def forward(self, hidden_states: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
        return hidden_states


class BlockInputCache:
    """Hidden states entering block ``layer`` of ``blocks``, per request (keyed by its token ids).

    Valid while nothing at or below that point changes: the embeddings and the blocks below
    ``layer`` frozen and deterministic (no active dropout). Rows must be right-padded (position
    ids then start at 0 in every row, so a row's states do not depend on the rest of its
    batch); a batch that is not is run in full and not cached. The states live on the model's
    device, in its dtype: ``sum of sequence lengths × hidden size`` values (:attr:`nbytes`).

    :meth:`forward` wraps one forward pass of the whole model: if every row of the batch is
    cached, the blocks below ``layer`` are replaced by pass-throughs for that pass and the
    input of block ``layer`` by the cached states (the model's own code still builds the
    attention mask, position ids and rotary embeddings of the batch); otherwise the pass is
    run as is and the states of the rows not yet cached are recorded.
    """

    def __init__(self, blocks: nn.ModuleList, layer: int):
        if not 0 < layer < len(blocks):
            raise ValueError(f"layer must be in 1..{len(blocks) - 1} (0 would cache nothing), got {layer}")
        self.blocks, self.layer = blocks, layer
        # every cached row lives in one pool (row 0 of which is zeros, for padding), so a batch
        # is assembled by one indexed read: key -> (first pool row, length)
        self._where: dict[tuple[int, ...], tuple[int, int]] = {}
        self._new: list[torch.Tensor] = []
        self._pool: Optional[torch.Tensor] = None
        self._rows = 1
        #: Forward passes run from the cached block (``hits``) and in full (``misses``).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._where)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached states, in bytes."""
        held = ([self._pool] if self._pool is not None else []) + self._new
        return sum(t.numel() * t.element_size() for t in held)

    def clear(self) -> None:
        self._where.clear()
        self._new.clear()
        self._pool, self._rows = None, 1
        self.hits = self.misses = 0

    def _pooled(self) -> torch.Tensor:
        if self._new:
            first = self._new[0]
            parts = [self._pool if self._pool is not None else first.new_zeros(1, first.shape[-1])] + self._new
            self._pool = torch.cat(parts)
            self._new = []
        assert self._pool is not None
        return self._pool

    @staticmethod
    def _keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[list[tuple[int, ...]]]:
        """Each row's unpadded token ids, or ``None`` when a row is not right-padded (read on the
        host: one copy per batch, not one per row)."""
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        lengths = attention_mask.sum(1)
        positions = torch.arange(attention_mask.shape[1])
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
            return None
        return [tuple(row[:n]) for row, n in zip(input_ids.tolist(), lengths.tolist())]

    @contextmanager
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
        keys = self._keys(input_ids, attention_mask)
        if keys is None:
            self.misses += 1
            yield
            return
        block = self.blocks[self.layer]
        if all(k in self._where for k in keys):
            pool = self._pooled()
            index = torch.zeros(input_ids.shape[0], input_ids.shape[1], dtype=torch.long)
            for b, k in enumerate(keys):  # padding positions read the zero row: no real token attends to them
                start, n = self._where[k]
                index[b, :n] = torch.arange(start, start + n)
            h = pool[index.to(pool.device)]

            def replace(mod: nn.Module, args: tuple, kwargs: dict):
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}

            lower = [self.blocks[i] for i in range(self.layer)]
            handle = block.register_forward_pre_hook(replace, with_kwargs=True)
            try:
                for i in range(self.layer):
                    self.blocks[i] = _Skip()
                self.hits += 1
                yield
            finally:
                for i, module in enumerate(lower):
                    self.blocks[i] = module
                handle.remove()
            return

        def record(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            for b, k in enumerate(keys):
                if k not in self._where:
                    self._where[k] = (self._rows, len(k))
                    self._rows += len(k)
                    self._new.append(x[b, : len(k)].clone())

        handle = block.register_forward_pre_hook(record, with_kwargs=True)
        try:
            self.misses += 1
            yield
        finally:
            handle.remove()


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
