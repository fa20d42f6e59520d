"""EMMET: batched equality-constrained edits (ROME's constraint for many facts at once).

Same keys, z and layer spreading as MEMIT; per layer the update is
Δ = R D⁻¹ Kᵀ C'⁻¹ with C' = ``mom2_update_weight``·C and D = Kᵀ C'⁻¹ K + ``emmet_lambda``·I,
inverted in float64 (pseudo-inverse fallback); cond(D) is logged per layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lit_edit.editors.memit import MEMIT
from lit_edit.closed_form import emmet_solve

__all__ = ["EMMET"]


class EMMET(MEMIT):
    """EMMET. See :class:`~lit_edit.editors.closed_form.ClosedFormEditor` for the shared arguments.

    Args:
        emmet_lambda: ridge added to D to counter ill-conditioning (0 = exact constraints).
    """

    family = "emmet"

    def __init__(self, *args: Any, emmet_lambda: float = 0.1, **kwargs: Any):
        super().__init__(*args, **kwargs)

    def solve(self, K: torch.Tensor, R: torch.Tensor, C: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        delta, cond = emmet_solve(K, R, C, float(self.setting("mom2_update_weight")), float(self.hparams["emmet_lambda"]))
        return delta, {"cond_D": cond}
