"""MEMIT: least-squares edits of many facts, spread over several layers.

1. z_i = h₀ + δ_i at the output of the last edited block (batched v*/z optimisation).
2. For each edited layer l_i in order: recompute the keys K with the current (partly edited)
   model, the residual R = (Z − H_last) / (n − i) where H_last is the current output of the last
   edited block at the fact token, solve Δ = R Kᵀ (λC + K Kᵀ)⁻¹ in float64 and add it at once.

Diagnostics per layer: the update norm, the fit ‖Δ K − R‖ / ‖R‖ and ``cond``, the estimated
condition number of λC + K Kᵀ (``edit/cond/layer<l>``, the largest as ``edit/cond_max``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from lit_edit.closed_form import (
    MEMIT_TEMPLATES,
    ValueResult,
    block_outputs_at,
    keys_at,
    memit_solve,
    optimize_values,
)
from lit_edit.data.request import EditRequest
from lit_edit.distributed import gather_objects, rank_and_world_size
from lit_edit.editors.closed_form import ClosedFormEditor
from lit_edit.progress import Progress

__all__ = ["MEMIT"]


class MEMIT(ClosedFormEditor):
    """MEMIT. ``statistics.update_weight`` is λ. See :class:`ClosedFormEditor` for the arguments."""

    family = "memit"
    template_spec = MEMIT_TEMPLATES
    value_site = "block"

    def solve(self, K: torch.Tensor, R: torch.Tensor, C: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The layer update ``Δ`` (``d_out × d_in``) for keys ``K`` (``d_in × E``) and residuals ``R``,
        with ``cond``: the estimated condition number of ``λC + K Kᵀ``, the matrix the solve inverts."""
        delta, cond = memit_solve(K, R, C, self.update_weight(), with_condition=True)
        return delta, {"cond": cond}

    def solve_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The update of ``layer``: :meth:`solve` with that layer's key statistics."""
        return self.solve(K, R, self.key_statistics(layer))

    def target_values(self, requests: list[EditRequest]):
        """z for every request at the last edited block, optimised ``values.batch_size`` at a time."""
        layers = self.edit_layers
        flat = [t for g in self.context_templates() for t in g]
        options = self.settings.values
        settings = self.value_settings()
        chunk = max(1, int(options.batch_size))
        batches = -(-len(requests) // chunk)
        results = []
        # the requests done so far, across the batches (each batch also counts its own steps):
        # a run of many short batches still writes a log line every 30 s
        done = Progress(len(requests), f"v*/z of {len(requests)} requests in {batches} batch(es) of {chunk}: requests",
                        logging.getLogger(__name__), enabled=batches > 1)
        with torch.enable_grad(), done:
            for s in range(0, len(requests), chunk):
                results.append(
                    optimize_values(
                        self.model, self.tokenizer, requests[s : s + chunk], layers[-1], "block", flat,
                        settings, partial=options.partial_forward, prefix_cache=options.prefix_cache, arch=self.arch,
                        desc=f"v*/z batch {s // chunk + 1}/{batches}",
                    )
                )
                done.update(len(requests[s : s + chunk]), loss=float(results[-1].loss.mean()))
        return results

    def shared_values(self, requests: list[EditRequest]) -> list[ValueResult]:
        """Each process optimises requests ``rank, rank + N, ...`` of the batch; the results are
        gathered and put back in request order (one :class:`ValueResult`)."""
        rank, world = rank_and_world_size()
        mine = self.target_values(requests[rank::world]) if rank < len(requests) else []
        fields = ("target", "initial", "delta", "loss", "nll", "steps")
        local = {f: torch.cat([getattr(r, f) for r in mine]).cpu() if mine else None for f in fields}
        device = self.model.device
        merged: dict[str, torch.Tensor] = {}
        for r, part in enumerate(gather_objects(local)):
            if part["target"] is None:
                continue
            rows = torch.arange(r, len(requests), world)
            for f in fields:
                if f not in merged:
                    merged[f] = torch.zeros((len(requests), *part[f].shape[1:]), dtype=part[f].dtype)
                merged[f][rows] = part[f]
        on_device = {f: merged[f].to(device) if f in ("target", "initial", "delta") else merged[f] for f in fields}
        return [ValueResult(**on_device)]

    @torch.no_grad()
    def edit(self, requests: list[EditRequest], values: Optional[list] = None) -> dict[str, float]:
        """Apply one edit batch. ``values`` may carry the :meth:`target_values` of these requests
        computed earlier (e.g. shared between MEMIT and EMMET with the same layers and settings).

        Each layer's update is checked by :attr:`guard` before it is written; a refused one raises
        :class:`~lit_edit.guards.UnsafeUpdateError` and puts back the layers this batch already
        edited, so the weights are as they were before the batch.
        """
        with self.edit_batch():
            return self._edit(requests, values)

    def _edit(self, requests: list[EditRequest], values: Optional[list]) -> dict[str, float]:
        layers = self.edit_layers
        groups = self.context_templates()
        results = values if values is not None else self.target_values(requests)
        Z = torch.cat([r.target for r in results])
        loss = torch.cat([r.loss for r in results])
        nll = torch.cat([r.nll for r in results])
        start = block_outputs_at(self.model, self.tokenizer, requests, layers[-1], arch=self.arch)
        diag: dict[str, float] = {
            "v_loss": float(loss.mean()), "v_nll": float(nll.mean()), "update_norm": 0.0, "update_ratio": 0.0,
        }
        extra_sum: dict[str, float] = {}
        for i, layer in enumerate(layers):
            K = keys_at(self.model, self.tokenizer, requests, layer, groups, arch=self.arch)  # (E, d_in)
            cur = block_outputs_at(self.model, self.tokenizer, requests, layers[-1], arch=self.arch)
            R = (Z - cur) / (len(layers) - i)  # (E, d_out)
            delta, extra = self.solve_layer(layer, K.T, R.T)
            size = self.write_update(layer, delta, requests)
            diag["update_ratio"] = max(diag["update_ratio"], size.ratio)
            diag["update_norm"] += float(delta.norm())
            diag[f"update_norm/layer{layer}"] = float(delta.norm())
            fit = (delta @ K.T.double() - R.T.double()).norm() / R.norm().clamp_min(1e-12)
            diag[f"layer_residual/layer{layer}"] = float(fit)
            for k, v in extra.items():
                diag[f"{k}/layer{layer}"] = v
                extra_sum[k] = max(extra_sum.get(k, 0.0), v)
        final = block_outputs_at(self.model, self.tokenizer, requests, layers[-1], arch=self.arch)
        diag["residual"] = float((Z - final).norm() / (Z - start).norm().clamp_min(1e-12))
        diag.update({f"{k}_max": v for k, v in extra_sum.items()})
        return diag
