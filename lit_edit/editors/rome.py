"""ROME: rank-one, equality-constrained edit of one layer's MLP output projection.

Each request of a batch is applied in turn (ROME edits one fact at a time):
k* = template-averaged key, v* = h₀ + δ from the v*/z optimisation at the projection's output,
Ŵ = W + Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*), so Ŵ k* = v* exactly (r-ROME key
consistency). ``original_rome=True`` reproduces the original code, which uses the bare prompt's
key in ``W k`` and the denominator (Ŵ k_prompt = v*).

Diagnostics: ``denominator`` (mean over the batch) and ``denominator_min`` of
``(C⁻¹k*)ᵀ k_d`` (r-ROME: ``k*ᵀ C⁻¹ k*``): the update is the residual divided by it, so a
denominator that falls over a sequential run (keys drifting into directions C holds little of)
precedes the runaway updates of a collapse.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from lit_edit.closed_form import ROME_TEMPLATES, keys_at, mlp_out_module, optimize_values, rome_solve
from lit_edit.data.request import EditRequest
from lit_edit.editors.closed_form import ClosedFormEditor, StatisticsOptions, TemplateOptions, ValueOptions
from lit_edit.guards import DEFAULT_MAX_UPDATE_RATIO

__all__ = ["ROME"]


class ROME(ClosedFormEditor):
    """ROME (r-ROME by default). See :class:`ClosedFormEditor` for the shared arguments.

    Args:
        original_rome: use the original ROME update (bare-prompt key in ``W k`` and the
            denominator) instead of r-ROME's consistent k*.
    """

    family = "rome"
    template_spec = ROME_TEMPLATES
    value_site = "mlp_out"

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        layers: Union[list[int], int, None] = None,
        values: ValueOptions = ValueOptions(),  # noqa: B008 (frozen)
        statistics: StatisticsOptions = StatisticsOptions(),  # noqa: B008 (frozen)
        templates: TemplateOptions = TemplateOptions(),  # noqa: B008 (frozen)
        accumulate: bool = True,
        original_rome: bool = False,
        max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO,
        on_bad_update: Literal["refuse", "warn"] = "refuse",
        chat_template: Literal["auto", "never", "always"] = "never",
    ):
        super().__init__(model, tokenizer, dtype, layers, values, statistics, templates, accumulate,
                         max_update_ratio=max_update_ratio, on_bad_update=on_bad_update, chat_template=chat_template)
        self._record_hparams(original_rome=bool(original_rome))

    @property
    def layer(self) -> int:
        layers = self.edit_layers
        if len(layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got {layers}")
        return layers[0]

    def _module_out(self, k: torch.Tensor) -> torch.Tensor:
        """Output of the layer's MLP output projection for key(s) ``k`` (with bias)."""
        module = mlp_out_module(self.model, self.layer, self.arch)
        with torch.no_grad():
            return module(k.to(module.weight.dtype)).float()

    @torch.no_grad()
    def edit(self, requests: list[EditRequest]) -> dict[str, float]:
        """Apply one edit batch in place, one rank-one update per request; returns diagnostics.

        Every update is checked by :attr:`guard` before it is written; a refused one raises
        :class:`~lit_edit.guards.UnsafeUpdateError` and puts back the updates this batch already
        wrote, so the weights are as they were before the batch.
        """
        with self.edit_batch():
            return self._edit(requests)

    def _edit(self, requests: list[EditRequest]) -> dict[str, float]:
        layer = self.layer
        groups = self.context_templates()
        flat = [t for g in groups for t in g]
        C = self.key_statistics(layer)
        settings = self.value_settings()
        partial = self.settings.values.partial_forward
        diag = {"v_loss": 0.0, "v_nll": 0.0, "v_steps": 0.0, "update_norm": 0.0, "residual": 0.0, "denominator": 0.0}
        largest, smallest = 0.0, float("inf")
        for r in requests:
            k_star = keys_at(self.model, self.tokenizer, [r], layer, groups, arch=self.arch)[0]
            with torch.enable_grad():
                val = optimize_values(
                    self.model, self.tokenizer, [r], layer, "mlp_out", flat, settings,
                    partial=partial, prefix_cache=self.settings.values.prefix_cache, arch=self.arch,
                )
            v_star = val.target[0]
            if self.hparams["original_rome"]:
                k_d = keys_at(self.model, self.tokenizer, [r], layer, [["{}"]], arch=self.arch)[0]
            else:
                k_d = k_star
            residual = v_star - self._module_out(k_d)
            delta, denominator = rome_solve(k_star, residual, C, denominator_key=k_d, with_denominator=True)
            largest = max(largest, self.write_update(layer, delta, [r]).ratio)
            after = self._module_out(k_d)
            diag["v_loss"] += float(val.loss[0])
            diag["v_nll"] += float(val.nll[0])
            diag["v_steps"] += float(val.steps[0])
            diag["update_norm"] += float(delta.norm())
            diag["residual"] += float((after - v_star).norm() / v_star.norm().clamp_min(1e-12))
            diag["denominator"] += denominator
            smallest = min(smallest, denominator)
        return {**{k: v / len(requests) for k, v in diag.items()}, "update_ratio": largest, "denominator_min": smallest}
