"""AlphaEdit: MEMIT's edits projected onto the null space of the preserved keys.

Same keys, z and layer spreading as MEMIT. Per layer, with ``C = E[k kᵀ]`` of generic text (the
key statistics) and ``P`` the projection onto the eigenvectors of ``C`` whose eigenvalues are
below ``nullspace_threshold``:

    Δ = Xᵀ,   (P (K Kᵀ + K_p K_pᵀ) + ridge·I) X = P K Rᵀ

where ``K_p K_pᵀ`` is the running sum of the keys of every edit batch applied before (kept in
checkpoints). The update satisfies ``Δ P = Δ``: outputs on keys in the span of the preserved
(large-eigenvalue) directions do not change, which is what keeps a long sequential run from
eroding the model. MEMIT's ``λC`` term is replaced by the projection; ``statistics.update_weight``
is not used.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Union

import torch
from typing_extensions import override

from lit_edit.closed_form import alphaedit_solve, keys_at, nullspace_projection
from lit_edit.data.request import EditRequest
from lit_edit.editors.closed_form import StatisticsOptions, TemplateOptions, ValueOptions
from lit_edit.editors.memit import MEMIT
from lit_edit.guards import DEFAULT_MAX_UPDATE_RATIO
from lit_edit.options import check_real

log = logging.getLogger(__name__)

__all__ = ["AlphaEdit"]

_STATE_KEY = "alphaedit_prior_keys"


class AlphaEdit(MEMIT):
    """AlphaEdit. See :class:`~lit_edit.editors.closed_form.ClosedFormEditor` for the shared arguments.

    Args:
        nullspace_threshold: eigenvalues of ``E[k kᵀ]`` below it span the subspace updates may
            use (the paper's 2e-2). The value is absolute, so it depends on the key scale of the
            model and layer: the log reports the null-space dimension and the share of the key
            energy it holds for each layer.
        ridge: the identity term of the solve (the reference implementation's ``L2``, 10).
        statistics: ``statistics.adjustment`` must stay on (the projection needs ``C``).

    The sum ``K_p K_pᵀ`` of the keys of earlier batches grows only when ``accumulate`` is on
    (sequential strategies) and is cleared by :meth:`restore`.
    """

    family = "alphaedit"

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
        nullspace_threshold: float = 2e-2,
        ridge: float = 10.0,
        max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO,
        on_bad_update: Literal["refuse", "warn"] = "refuse",
        chat_template: Literal["auto", "never", "always"] = "never",
    ):
        check_real("nullspace_threshold", nullspace_threshold, minimum=0, exclusive=True)
        check_real("ridge", ridge, minimum=0, exclusive=True)
        super().__init__(model, tokenizer, dtype, layers, values, statistics, templates, accumulate,
                         max_update_ratio=max_update_ratio, on_bad_update=on_bad_update, chat_template=chat_template)
        if not self._resolve("statistics").adjustment:
            raise ValueError("AlphaEdit needs the key statistics: statistics.adjustment must be true")
        self._record_hparams(nullspace_threshold=float(nullspace_threshold), ridge=float(ridge))
        self._projections: dict[int, torch.Tensor] = {}
        #: ``K_p K_pᵀ`` per edited layer (float64, CPU): the keys of the batches applied so far.
        self.prior_keys: dict[int, torch.Tensor] = {}

    def projection(self, layer: int) -> torch.Tensor:
        """``P`` of ``layer`` (float64), computed once from the key statistics."""
        if layer not in self._projections:
            C = self.key_statistics(layer)
            P, info = nullspace_projection(C, float(self.hparams["nullspace_threshold"]))
            log.info(
                "AlphaEdit layer %d: null space of dimension %d of %d (%.1f%% of the key energy) at threshold %g",
                layer, int(info["nullspace_dim"]), P.shape[0], 100 * info["nullspace_energy"],
                float(self.hparams["nullspace_threshold"]),
            )
            self._projections[layer] = P.cpu()
        return self._projections[layer]

    @override
    def solve_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        P = self.projection(layer).to(K.device)
        prior = self.prior_keys.get(layer)
        delta, cond = alphaedit_solve(K, R, P, prior, float(self.hparams["ridge"]))
        return delta, {"cond": cond}

    @override
    def _edit(self, requests: list[EditRequest], values: Optional[list]) -> dict[str, float]:
        diag = super()._edit(requests, values)
        if self.hparams["accumulate"]:
            groups = self.context_templates()
            for layer in self.edit_layers:  # keys of this batch on the edited model, as the reference does
                K = keys_at(self.model, self.tokenizer, requests, layer, groups, arch=self.arch).double().cpu()
                prior = self.prior_keys.get(layer)
                self.prior_keys[layer] = K.T @ K if prior is None else prior + K.T @ K
        diag["prior_keys_trace"] = float(sum(float(p.trace()) for p in self.prior_keys.values()))
        return diag

    @override
    def restore(self, forget: bool = True) -> None:
        super().restore(forget)
        self.prior_keys = {}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_STATE_KEY] = {int(k): v.clone() for k, v in self.prior_keys.items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(_STATE_KEY) or {}
        loaded: dict[int, torch.Tensor] = {}
        for layer, value in state.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != value.shape[1]:
                raise ValueError(f"checkpoint {_STATE_KEY}[{layer}] is not a square matrix")
            if not torch.isfinite(value).all():
                raise ValueError(f"checkpoint {_STATE_KEY}[{layer}] holds non-finite values")
            loaded[int(layer)] = value.to(torch.float64)
        self.prior_keys = loaded
