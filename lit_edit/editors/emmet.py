"""EMMET: batched equality-constrained edits (ROME's constraint for many facts at once).

Same keys, z and layer spreading as MEMIT; per layer the update is
Δ = R D⁻¹ Kᵀ C'⁻¹ with C' = ``statistics.update_weight``·C and D = Kᵀ C'⁻¹ K + ``emmet_lambda``·I,
inverted in float64 (pseudo-inverse fallback); cond(D) is logged per layer.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from lit_edit.closed_form import emmet_solve
from lit_edit.editors.closed_form import StatisticsOptions, TemplateOptions, ValueOptions
from lit_edit.editors.memit import MEMIT
from lit_edit.guards import DEFAULT_MAX_UPDATE_RATIO
from lit_edit.options import check_real

__all__ = ["EMMET"]


class EMMET(MEMIT):
    """EMMET. See :class:`~lit_edit.editors.closed_form.ClosedFormEditor` for the shared arguments.

    Args:
        emmet_lambda: ridge added to D to counter ill-conditioning (0 = exact constraints).
    """

    family = "emmet"

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
        emmet_lambda: float = 0.1,
        max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO,
        on_bad_update: Literal["refuse", "warn"] = "refuse",
        chat_template: Literal["auto", "never", "always"] = "never",
    ):
        check_real("emmet_lambda", emmet_lambda, minimum=0)  # TypeError / ValueError naming it (NaN, inf, < 0)
        super().__init__(model, tokenizer, dtype, layers, values, statistics, templates, accumulate,
                         max_update_ratio=max_update_ratio, on_bad_update=on_bad_update, chat_template=chat_template)
        self._record_hparams(emmet_lambda=float(emmet_lambda))

    def solve(self, K: torch.Tensor, R: torch.Tensor, C: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        delta, cond = emmet_solve(K, R, C, self.update_weight(), float(self.hparams["emmet_lambda"]))
        return delta, {"cond_D": cond}
