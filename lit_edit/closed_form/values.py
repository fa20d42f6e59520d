"""The v*/z optimisation: target values for a batch of requests, one free δ per request.

For each request a vector δ is added at the fact token of every rewriting prompt (context
template + prompt + target tokens but the last) at a *site*: the output of a layer's MLP
output projection (ROME) or the output of a whole block (MEMIT/EMMET). Adam minimises, per
request,

    mean_p NLL(target [+ stop] | prompt_p; h + δ) + kl_factor · KL(P(·|"{subject} is a"; h+δ) ‖ P(·|…; h))
    + v_weight_decay · ‖δ‖ / ‖h₀‖²

and after every step ‖δ‖ is clamped to ``clamp_norm_factor · ‖h₀‖``. A request stops when its
loss falls below ``loss_tol``; the others go on. Adam is element-wise, so optimising the
requests together gives the same vectors as optimising them one at a time.

Speed: the blocks below the site are run once (their outputs are fixed); each step runs only
the blocks from the site's layer up, with the per-block arguments (attention mask, rotary
position embeddings, …) captured from that first pass, and the final norm and LM head are
applied only at the positions the loss reads. ``partial=False`` runs the whole model each step
instead (same result; for architectures whose blocks cannot be called on their own).

Attention is causal and δ enters at the fact token, so nothing before the fact token changes
during the optimisation: with ``prefix_cache`` (by default on a CPU; for the ``sdpa`` and
``eager`` attention implementations) the first pass also records every block's keys and values of those
positions, and each step runs the blocks only from the fact token onward (the earliest fact token
of a sub-batch), attending to the recorded prefix. Rows are grouped into sub-batches by where
their fact token and their end fall (:func:`span_groups`), so a step runs little more than the
positions δ can change.

Progress: the steps of an optimisation are counted by :class:`lit_edit.progress.Progress` (a
bar in a terminal, a log line every 30 s otherwise, with the requests still active and their
mean loss); ``progress=False`` turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lit_edit.closed_form.hooks import first_tensor, forward_until, replace_first, run_until_stopped, stop_before
from lit_edit.closed_form.keys import mlp_out_module
from lit_edit.closed_form.tokens import encode_in_template
from lit_edit.data.request import EditRequest
from lit_edit.data.tokenize import pad_rows
from lit_edit.models import ArchSpec, arch_for
from lit_edit.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["ValueSettings", "ValueResult", "optimize_values", "span_groups"]


@dataclass(frozen=True)
class ValueSettings:
    """Hyperparameters of the v*/z optimisation (docs/methods.md §2)."""

    lr: float = 0.5
    steps: int = 20
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    loss_tol: float = 5e-2
    kl_prompt: str = "{} is a"
    stop: Optional[str] = None
    """Stop-aware target: ``None`` (target tokens only), ``"eos"`` (target + EOS) or a stop
    string tokenized after the target (e.g. ``"."``); the NLL then covers the stop token(s) too,
    in every context-template row."""


@dataclass
class ValueResult:
    target: torch.Tensor
    """``(R, d)``: h₀ + δ, the value each request should produce at the site."""
    initial: torch.Tensor
    """``(R, d)``: h₀, the unedited site output at the fact token of the bare prompt."""
    delta: torch.Tensor
    loss: torch.Tensor
    """``(R,)``: each request's loss at its last evaluated step."""
    nll: torch.Tensor
    steps: torch.Tensor
    """``(R,)``: Adam steps taken per request."""


def _select(obj: Any, idx: torch.Tensor, n: int) -> Any:
    """Index every per-row tensor (first dim ``n``, at least 2-D) of a nested argument structure."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim >= 2 and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_select(o, idx, n) for o in obj)
    if isinstance(obj, list):
        return [_select(o, idx, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _select(v, idx, n) for k, v in obj.items()}
    return obj


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
"""Names under which a block passes its attention a key/value cache (by transformers version)."""
_SLICED_KWARGS = {"attention_mask", "position_embeddings", "position_ids", "cache_position", "use_cache"}
"""Block arguments the prefix-cached step knows how to restrict to the suffix positions."""


class _PrefixKV:
    """Stands in for a key/value cache inside one block's attention.

    Recording (``keys is None``): keeps the first ``keep`` positions of the keys and values the
    attention computed and hands them back unchanged. Replaying: returns the recorded prefix
    followed by the new positions' keys and values, so the queries of the suffix attend to both.
    """

    def __init__(self, keep: int = 0, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None):
        self.keep, self.keys, self.values = keep, keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.keys is None:
            self.keys = key_states[:, :, : self.keep].detach()
            self.values = value_states[:, :, : self.keep].detach()
            return key_states, value_states
        return torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)


def _suffix_mask(mask: torch.Tensor, skip: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``(rows, 1, T - skip, T)``: query column ``c ≥ skip`` sees every real
    key at a column ``≤ c``."""
    width = mask.shape[1]
    cols = torch.arange(width, device=mask.device)
    allowed = (cols[None, :] <= cols[skip:, None])[None] & mask.bool()[:, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def span_groups(starts: Sequence[int], ends: Sequence[int], overhead: int = 32) -> list[list[int]]:
    """Rows split into sub-batches that each run the columns ``[min start, max end)`` of their rows.

    Minimises the tokens run (rows × (longest end − earliest start), summed) plus ``overhead``
    tokens per sub-batch, by a dynamic programme over contiguous runs of the rows' distinct
    ``(start, end)`` spans taken in three orders (by start, by end, by span length); the cheapest
    plan wins. With every start 0 this is :func:`lit_edit.losses.length_groups`' problem.
    """
    spans = sorted(set(zip(starts, ends)))
    members: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(starts, ends)):
        members.setdefault(key, []).append(i)
    best_plan: Optional[list[list[tuple[int, int]]]] = None
    best_cost = float("inf")
    for key in (lambda k: (k[0], k[1]), lambda k: (k[1], k[0]), lambda k: (k[1] - k[0], k[0])):
        order = sorted(spans, key=key)
        n = len(order)
        cost = [0.0] + [float("inf")] * n
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            rows, lo, hi = 0, None, 0
            for i in range(j, 0, -1):  # last sub-batch: order[i-1 .. j-1]
                s, e = order[i - 1]
                rows += len(members[(s, e)])
                lo = s if lo is None else min(lo, s)
                hi = max(hi, e)
                c = cost[i - 1] + rows * (hi - lo) + overhead
                if c < cost[j]:
                    cost[j], cut[j] = c, i - 1
        if cost[n] < best_cost:
            plan, j = [], n
            while j > 0:
                plan.append(order[cut[j]:j])
                j = cut[j]
            best_cost, best_plan = cost[n], plan[::-1]
    return [[i for key in part for i in members[key]] for part in best_plan or []]


class _Rows:
    """All rows of a value optimisation: rewriting rows per request, then one KL row per request."""

    def __init__(
        self,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        templates: Sequence[str],
        kl_prompt: str,
        stop: Optional[str] = None,
    ):
        if templates[0] != "{}":
            raise ValueError("the first context template must be the bare prompt '{}'")
        ids, fact, owner, tgt_pos, tgt_tok, tgt_owner_row = [], [], [], [], [], []
        self.n_templates = len(templates)
        for b, r in enumerate(requests):
            for t in templates:
                e = encode_in_template(tokenizer, r, t, with_target=True, stop=stop)
                row = len(ids)
                ids.append(e.ids)
                fact.append(e.fact_index)
                owner.append(b)
                for j, tok in enumerate(e.target_ids):
                    tgt_pos.append((row, e.prompt_length - 1 + j))
                    tgt_tok.append(tok)
                    tgt_owner_row.append(row)
        self.n_rewrite = len(ids)
        for b, r in enumerate(requests):
            e = encode_in_template(tokenizer, r, "{}", prompt=kl_prompt.replace("{}", r.subject))
            ids.append(e.ids)
            fact.append(e.fact_index)
            owner.append(b)
        self.ids, self.mask = pad_rows(ids, tokenizer.pad_token_id)
        self.fact = torch.tensor(fact)
        self.owner = torch.tensor(owner)
        self.tgt_row = torch.tensor([p[0] for p in tgt_pos])
        self.tgt_col = torch.tensor([p[1] for p in tgt_pos])
        self.tgt_tok = torch.tensor(tgt_tok)
        self.n_requests = len(requests)
        counts = torch.zeros(len(ids))
        counts.index_add_(0, self.tgt_row, torch.ones(len(tgt_pos)))
        self.tgt_count = counts  # target tokens per row

    def rows_of(self, active: torch.Tensor) -> torch.Tensor:
        """Row indices (rewrite rows, then KL rows) owned by the active requests, in order."""
        keep = active[self.owner]
        return keep.nonzero(as_tuple=True)[0]


class _Runner:
    """Runs the model from the site's block up with δ added at the fact tokens."""

    def __init__(self, model: nn.Module, arch: ArchSpec, layer: int, site: str, partial: bool, prefix: bool = False):
        self.model, self.arch, self.layer, self.site, self.partial = model, arch, layer, site, partial
        self.prefix = prefix and partial
        self.skip = 0  # leading columns every step leaves out (their keys and values are recorded)
        self._kv: list[_PrefixKV] = []
        self._cache_name: Optional[str] = None
        self.blocks = model.get_submodule(arch.layers)
        self.norm = model.get_submodule(arch.final_norm)
        self.head = model.get_submodule(arch.lm_head)
        self.site_module = self.blocks[layer] if site == "block" else mlp_out_module(model, layer, arch)
        self.start = layer + 1 if site == "block" else layer
        self._captured: Optional[list[tuple[tuple, dict]]] = None
        self._h_in: Optional[torch.Tensor] = None

    @torch.no_grad()
    def prepare(self, ids: torch.Tensor, mask: torch.Tensor, fact: torch.Tensor) -> torch.Tensor:
        """One plain pass: records h₀ at the site for every row and, for the partial run, the
        input and arguments of every block from ``start`` up. Returns h₀ ``(rows, d)``."""
        got: dict[str, Any] = {}
        handles = []
        rows = torch.arange(ids.shape[0], device=ids.device)

        def site_hook(mod, args, output):
            got["h0"] = first_tensor(output)[rows, fact].detach().clone()

        handles.append(self.site_module.register_forward_hook(site_hook))
        captured: list[tuple[tuple, dict]] = []
        skip = int(fact.min()) if self.prefix and self.start < len(self.blocks) else 0
        recorders: list[_PrefixKV] = []
        if self.partial:
            for j in range(self.start, len(self.blocks)):
                def pre(mod, args, kwargs, _j=j):
                    captured.append((args, dict(kwargs)))
                    name = next((k for k in _CACHE_KWARGS if k in kwargs), None)
                    if skip and name is not None and kwargs[name] is None:
                        recorders.append(_PrefixKV(skip))
                        return args, {**kwargs, name: recorders[-1]}
                    return None
                handles.append(self.blocks[j].register_forward_pre_hook(pre, with_kwargs=True))

        stop = stop_before(self.norm, lambda args, kwargs: got.__setitem__("final_in", args[0] if args else None))
        try:
            with stop if self.partial else nullcontext():
                run_until_stopped(lambda: self.model(input_ids=ids, attention_mask=mask, use_cache=False))
        finally:
            for h in handles:
                h.remove()
        if self.partial:
            self._captured = captured
            if captured:
                self._h_in = captured[0][0][0] if captured[0][0] else captured[0][1]["hidden_states"]
            else:  # the site is the last block: the final norm's input is its output
                self._h_in = got["final_in"]
            if skip and self._suffix_only(captured, recorders, skip, mask):
                self._h_in = self._h_in[:, skip:]
        return got["h0"].float()

    def _suffix_only(self, captured: list[tuple[tuple, dict]], recorders: list[_PrefixKV], skip: int, mask: torch.Tensor) -> bool:
        """Restrict the recorded block arguments to the columns from ``skip`` on; ``False`` (and
        nothing changed) when a block's arguments or attention are not ones this knows."""
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if impl not in ("sdpa", "eager") or len(recorders) != len(captured) or not captured or captured[0][0][1:]:
            return False
        names = {next((k for k in _CACHE_KWARGS if k in kw), None) for _, kw in captured}
        if len(names) != 1 or None in names:
            return False
        name = names.pop()
        if any(k not in _SLICED_KWARGS and k != name and v is not None for _, kw in captured for k, v in kw.items()):
            return False
        if any(r.keys is None or r.keys.shape[2] != skip for r in recorders):
            return False
        dtype = self._h_in.dtype
        suffix_mask = _suffix_mask(mask, skip, dtype)
        sliced = []
        for _, kw in captured:
            kw = dict(kw)
            kw["attention_mask"] = suffix_mask
            if kw.get("position_embeddings") is not None:
                kw["position_embeddings"] = tuple(x[..., skip:, :] for x in kw["position_embeddings"])
            for k in ("position_ids", "cache_position"):
                if kw.get(k) is not None:
                    kw[k] = kw[k][..., skip:]
            sliced.append(((), kw))
        self._captured, self._kv, self._cache_name, self.skip = sliced, recorders, name, skip
        return True

    def hidden(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
        fact: torch.Tensor,
        add: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Final-block hidden states ``(len(rows), T - skip, d)`` with ``add[i]`` added at ``fact[i]``
        (columns counted from ``skip``, the recorded prefix, in the partial run)."""
        local = torch.arange(len(rows), device=ids.device)
        fact = fact - self.skip

        def add_hook(mod, args, output):
            if add is None:
                return output
            h = first_tensor(output)
            h = h.clone()
            h[local, fact] = h[local, fact] + add.to(h.dtype)
            return replace_first(output, h)

        if not self.partial:
            handle = self.site_module.register_forward_hook(add_hook)
            try:
                return forward_until(self.model, self.norm, "input", ids[rows], mask[rows])
            finally:
                handle.remove()
        n = self._h_in.shape[0]
        h = self._h_in[rows]
        if self.site == "block" and add is not None:  # the site's output is the input captured here
            h = h.clone()
            h[local, fact] = h[local, fact] + add.to(h.dtype)
        if self.start == len(self.blocks):
            return h
        handle = self.site_module.register_forward_hook(add_hook) if self.site != "block" else None
        try:
            for (args, kwargs), j in zip(self._captured, range(self.start, len(self.blocks))):
                a = (h,) + tuple(_select(x, rows, n) for x in args[1:])
                kw = _select(kwargs, rows, n)
                if self._kv:
                    kv = self._kv[j - self.start]
                    kw[self._cache_name] = _PrefixKV(0, kv.keys[rows], kv.values[rows])
                if not args:
                    kw["hidden_states"] = h
                    a = ()
                h = first_tensor(self.blocks[j](*a, **kw))
        finally:
            if handle is not None:
                handle.remove()
        return h

    def log_probs(self, h: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the LM head at positions ``(r, c)`` only (``c`` counted from column 0)."""
        x = self.norm(h[r, c - self.skip].unsqueeze(0)).squeeze(0)
        return self.head(x).float().log_softmax(-1)


def optimize_values(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    site: str = "mlp_out",
    templates: Sequence[str] = ("{}",),
    settings: ValueSettings = ValueSettings(),
    partial: bool = True,
    arch: Optional[ArchSpec] = None,
    progress: bool = True,
    desc: str = "v*/z",
    group_rows: bool = True,
    prefix_cache: Optional[bool] = None,
) -> ValueResult:
    """Optimise one δ per request (all in one batch) and return the target values h₀ + δ.

    Args:
        site: ``"mlp_out"`` (δ at the output of ``layer``'s MLP output projection, ROME) or
            ``"block"`` (δ at the output of block ``layer``, MEMIT/EMMET).
        templates: flat list of context templates; the first must be ``"{}"``.
        partial: run only the blocks from ``layer`` up in the loop (default) or the whole model.
        progress: count the steps (a bar in a terminal, a log line every 30 s otherwise).
        desc: what the progress lines call this optimisation (e.g. ``"v*/z batch 2/7"``).
        group_rows: run the rows (every request's context-template and KL prompts) as a few
            sub-batches of similar length (:func:`lit_edit.losses.length_groups`) instead of one
            batch padded to the longest row; each row's result does not depend on its batch, so
            the vectors are the same up to float rounding.
        prefix_cache: in the partial run, record the keys and values of the positions before
            each sub-batch's earliest fact token once and run every step from there on (same
            vectors up to float rounding; falls back to whole rows where the attention
            implementation or the block arguments are not ``sdpa``/``eager`` Llama-style ones).
            ``None`` (default): on when the model is on a CPU, where it saves work in proportion
            to the positions left out (1.66× on SmolLM2-135M), off on an accelerator, where a
            small model's step is bound by kernel launches and the extra sub-batches cost more
            than the positions saved (0.6× on an H200).
    """
    if site not in ("mlp_out", "block"):
        raise ValueError(f"site must be 'mlp_out' or 'block', got {site!r}")
    from lit_edit.losses import group_overhead, length_groups

    arch = arch or arch_for(model)
    device = next(model.parameters()).device
    data = _Rows(tokenizer, requests, list(templates), settings.kl_prompt, settings.stop)
    ids, mask, fact = data.ids.to(device), data.mask.to(device), data.fact.to(device)
    owner = data.owner.to(device)
    n_rows = ids.shape[0]
    lengths = data.mask.sum(1).tolist()
    if prefix_cache is None:
        prefix_cache = device.type == "cpu"
    prefix = prefix_cache and partial
    if not group_rows:
        groups = [list(range(n_rows))]
    elif prefix:
        groups = span_groups(data.fact.tolist(), lengths, group_overhead(device))
    else:
        groups = length_groups(lengths, group_overhead(device))
    group_of = torch.zeros(n_rows, dtype=torch.long, device=device)
    local = torch.zeros(n_rows, dtype=torch.long, device=device)
    parts: list[tuple[torch.Tensor, _Runner, torch.Tensor, torch.Tensor]] = []
    for g, rows_g in enumerate(groups):
        index = torch.tensor(rows_g, dtype=torch.long, device=device)
        width = max(lengths[i] for i in rows_g)
        group_of[index] = g
        local[index] = torch.arange(len(rows_g), device=device)
        runner = _Runner(model, arch, layer, site, partial, prefix)
        parts.append((index, runner, ids[index, :width], mask[index, :width]))
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    bar = Progress(settings.steps, f"{desc} ({len(requests)} requests, layer {layer}) steps", log, enabled=progress)

    def run(rows: torch.Tensor, add: Optional[torch.Tensor], *positions: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """For each ``(at_r, at_c)`` of ``positions``, the log-probabilities at those (row,
        column) positions (global rows, each among ``rows``), with ``add[i]`` added at the fact
        token of ``rows[i]``: one pass per length group holding some of the rows."""
        outs: list[Optional[torch.Tensor]] = [None] * len(positions)
        for g, (_, runner, ids_g, mask_g) in enumerate(parts):
            in_g = group_of[rows] == g
            if not bool(in_g.any()):
                continue
            rows_g = rows[in_g]
            slot = torch.full((n_rows,), -1, dtype=torch.long, device=device)
            slot[rows_g] = torch.arange(len(rows_g), device=device)
            h = runner.hidden(ids_g, mask_g, local[rows_g], fact[rows_g], None if add is None else add[in_g])
            for k, (at_r, at_c) in enumerate(positions):
                want = (group_of[at_r] == g) & (slot[at_r] >= 0)
                if not bool(want.any()):
                    continue
                lp = runner.log_probs(h, slot[at_r[want]], at_c[want])
                if len(parts) == 1:
                    outs[k] = lp
                    continue
                out = lp.new_zeros(len(at_r), lp.shape[-1]) if outs[k] is None else outs[k]
                outs[k] = out.index_put((want.nonzero(as_tuple=True)[0],), lp)
        return outs  # type: ignore[return-value]

    try:
        h0_parts = [(index, runner.prepare(ids_g, mask_g, fact[index])) for index, runner, ids_g, mask_g in parts]
        h0_rows = h0_parts[0][1].new_zeros(n_rows, h0_parts[0][1].shape[1])
        for index, got in h0_parts:
            h0_rows[index] = got
        R, T = data.n_requests, data.n_templates
        h0 = h0_rows[torch.arange(R, device=device) * T]  # bare-prompt row of each request
        kl_rows = torch.arange(data.n_rewrite, data.n_rewrite + R, device=device)
        with torch.no_grad():
            ref_kl = run(kl_rows, None, (kl_rows, fact[kl_rows]))[0]  # (R, V)

        delta = torch.zeros(R, h0.shape[1], device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=settings.lr)
        active = torch.ones(R, dtype=torch.bool, device=device)
        steps = torch.zeros(R, dtype=torch.long)
        last_loss = torch.zeros(R)
        last_nll = torch.zeros(R)
        h0_norm = h0.norm(dim=1)
        tgt_row, tgt_col, tgt_tok = data.tgt_row.to(device), data.tgt_col.to(device), data.tgt_tok.to(device)
        tgt_count = data.tgt_count.to(device)
        for it in range(settings.steps):
            rows = data.rows_of(active.cpu()).to(device)
            add = delta[owner[rows]]
            # rewriting NLL at target positions of active rows, and the KL at the fact token of
            # "{subject} is a" of each active request, from one pass over the active rows
            sel = active[owner[tgt_row]]
            act_idx = active.nonzero(as_tuple=True)[0]
            lp, new_kl = run(rows, add, (tgt_row[sel], tgt_col[sel]), (kl_rows[act_idx], fact[kl_rows[act_idx]]))
            tok_nll = -lp.gather(1, tgt_tok[sel, None]).squeeze(1)
            row_nll = torch.zeros(n_rows, device=device).index_add(0, tgt_row[sel], tok_nll)
            row_nll = row_nll / tgt_count.clamp_min(1)
            req_nll = torch.zeros(R, device=device).index_add(0, owner[: data.n_rewrite], row_nll[: data.n_rewrite]) / T
            ref = ref_kl[act_idx]
            kl = torch.zeros(R, device=device)
            kl[act_idx] = (new_kl.exp() * (new_kl - ref)).sum(-1)
            wd = settings.weight_decay * delta.norm(dim=1) / h0_norm.pow(2)
            loss = req_nll + settings.kl_factor * kl + wd
            with torch.no_grad():
                last_loss[active.cpu()] = loss.detach()[active].cpu()
                last_nll[active.cpu()] = req_nll.detach()[active].cpu()
                done = active & (loss.detach() < settings.loss_tol)
                active = active & ~done
            bar.update(1, active=int(active.sum()), loss=float(last_loss.mean()))
            if it == settings.steps - 1 or not bool(active.any()):
                break
            opt.zero_grad()
            loss[active].sum().backward()
            before = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                frozen = ~active
                delta[frozen] = before[frozen]
                max_norm = settings.clamp_norm_factor * h0_norm
                norm = delta.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
                delta.mul_(scale[:, None])
            steps[active.cpu()] += 1
    finally:
        bar.close()
        for p, rg in zip(model.parameters(), requires):
            p.requires_grad_(rg)
    d = delta.detach()
    return ValueResult(target=h0 + d, initial=h0, delta=d, loss=last_loss, nll=last_nll, steps=steps)
