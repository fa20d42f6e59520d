"""Guards on every update an editor writes into a model (docs/methods.md §5.1).

Before an update ΔW is added to a weight W, :class:`UpdateGuard` checks that it is finite and
measures its size relative to the weight, two ways:

* ``relative_norm`` = ‖ΔW‖_F / ‖W‖_F (how much the matrix as a whole moves);
* ``relative_max`` = max |ΔW| / max |W| (how far the most-moved element goes, relative to the
  weight's largest element).

The larger of the two (:attr:`UpdateSize.ratio`) is compared with ``max_update_ratio``. A
non-finite update is always refused; an update above the limit is refused
(``on_bad_update="refuse"``, the default: :class:`UnsafeUpdateError`, naming the requests, the
tensor, the ratios and the reason, and the weights are left exactly as they were) or written
with an :class:`UnsafeUpdateWarning` (``"warn"``).

The closed-form editors (ROME, MEMIT, EMMET) check each update before adding it; the
fine-tuning editors check, after every optimizer step, that the tuned tensors are finite and that
their total change W − W₀ from the original stays under the limit, and put the pre-step values
back when it does not.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_UPDATE_RATIO",
    "BadUpdatePolicy",
    "UnsafeUpdateError",
    "UnsafeUpdateWarning",
    "UpdateGuard",
    "UpdateSize",
    "update_size",
]

#: Default limit on :attr:`UpdateSize.ratio`. Real edits on SmolLM2-135M stay far below it: ROME
#: ≤ 0.27 per update (0.45 after 24 sequential edits), MEMIT/EMMET ≤ 0.23 per layer, LocFT-BF
#: ≤ 0.31 and depth-first FT 0.38 in total (docs/methods.md §5.1); broken settings (a zero C,
#: λ = 0, lr = 1e3, float16 Adam) give 10³-10⁶ or NaN.
DEFAULT_MAX_UPDATE_RATIO = 10.0

#: What to do with an update above the limit.
BadUpdatePolicy = Literal["refuse", "warn"]


class UnsafeUpdateError(RuntimeError):
    """An update was refused: it is not finite or larger than ``max_update_ratio`` allows.

    Attributes: ``tensor`` (the weight's name), ``reason``, ``size`` (:class:`UpdateSize`) and
    ``case_ids`` (the requests of the edit batch).
    """

    def __init__(self, message: str, tensor: str, reason: str, size: UpdateSize, case_ids: Sequence[Any]):
        super().__init__(message)
        self.tensor = tensor
        self.reason = reason
        self.size = size
        self.case_ids = list(case_ids)


class UnsafeUpdateWarning(UserWarning):
    """An update larger than ``max_update_ratio`` was written (``on_bad_update="warn"``)."""


@dataclass(frozen=True)
class UpdateSize:
    """The size of one update relative to the weight it is added to."""

    tensor: str
    relative_norm: float
    """‖ΔW‖_F / ‖W‖_F (``inf`` for a non-zero update of a zero weight)."""
    relative_max: float
    """max |ΔW| / max |W|."""
    finite: bool
    """Whether every element of ΔW (and of W + ΔW) is finite."""

    @property
    def ratio(self) -> float:
        """The figure compared with the limit: the larger of the two ratios (``nan`` if not finite)."""
        if not self.finite:
            return math.nan
        return max(self.relative_norm, self.relative_max)

    def describe(self) -> str:
        return f"‖ΔW‖/‖W‖ = {self.relative_norm:.3g}, max|ΔW|/max|W| = {self.relative_max:.3g}"


def _ratio(num: float, den: float) -> float:
    if num == 0:
        return 0.0
    return num / den if den > 0 else math.inf


@torch.no_grad()
def update_size(tensor: str, weight: torch.Tensor, delta: torch.Tensor) -> UpdateSize:
    """Measure ``delta`` against ``weight`` (same shape; any dtypes and devices), in float32, or
    in float64 when either is float64.

    ``finite`` is false when ``delta`` has a NaN/inf element or when ``weight + delta`` does
    (an update that overflows the weight's dtype).
    """
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit {tensor} of shape {tuple(weight.shape)}")
    acc = torch.float64 if torch.float64 in (weight.dtype, delta.dtype) else torch.float32
    w = weight.detach().to(acc)
    d = delta.detach().to(device=w.device, dtype=acc)
    finite = bool(torch.isfinite(d).all())
    if finite and weight.dtype != torch.float64:
        # the written value must be representable in the weight's dtype
        finite = bool(torch.isfinite((w + d).to(weight.dtype)).all())
    if not finite:
        return UpdateSize(tensor, math.nan, math.nan, False)
    return UpdateSize(
        tensor,
        relative_norm=_ratio(float(d.norm()), float(w.norm())),
        relative_max=_ratio(float(d.abs().max()) if d.numel() else 0.0, float(w.abs().max()) if w.numel() else 0.0),
        finite=True,
    )


def _ids(case_ids: Sequence[Any]) -> str:
    ids = list(case_ids)
    shown = ", ".join(repr(i) for i in ids[:10])
    return f"[{shown}{', …' if len(ids) > 10 else ''}] ({len(ids)} request(s))"


class UpdateGuard:
    """Checks updates before they are written (module docstring).

    Args:
        max_update_ratio: limit on the larger of ‖ΔW‖_F/‖W‖_F and max|ΔW|/max|W|; ``None`` (or
            ``inf``) checks finiteness only.
        on_bad_update: ``"refuse"`` (raise :class:`UnsafeUpdateError`) or ``"warn"`` (write it
            with an :class:`UnsafeUpdateWarning`) for an update above the limit. A non-finite
            update is always refused.
    """

    def __init__(self, max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO, on_bad_update: str = "refuse"):
        number = isinstance(max_update_ratio, (int, float)) and not isinstance(max_update_ratio, bool)
        if max_update_ratio is not None and not (number and max_update_ratio > 0):
            raise ValueError(f"max_update_ratio must be a number > 0 (or null to check finiteness only), got {max_update_ratio!r}")
        if on_bad_update not in ("refuse", "warn"):
            raise ValueError(f"on_bad_update must be 'refuse' or 'warn', got {on_bad_update!r}")
        self.max_update_ratio = None if max_update_ratio is None or math.isinf(max_update_ratio) else float(max_update_ratio)
        self.on_bad_update = on_bad_update

    def check(
        self,
        tensor: str,
        weight: torch.Tensor,
        delta: torch.Tensor,
        case_ids: Sequence[Any] = (),
        what: str = "update",
        hint: str = "",
    ) -> UpdateSize:
        """Measure ``delta`` against ``weight``; raise or warn if it is unsafe (nothing is written here).

        ``what`` names the quantity in messages (``"update"``, ``"change since the original"``);
        ``hint`` is appended to them (what to look at).
        """
        size = update_size(tensor, weight, delta)
        limit = self.max_update_ratio
        if not size.finite:
            reason = "not finite (NaN or inf)"
        elif limit is not None and size.ratio > limit:
            reason = f"too large ({size.describe()} > max_update_ratio {limit:g})"
        else:
            return size
        where = f"{what} of {tensor} for request(s) {_ids(case_ids)} is {reason}"
        if size.finite and self.on_bad_update == "warn":
            message = f"{where}; writing it anyway (on_bad_update='warn')"
            log.warning(message)
            warnings.warn(message, UnsafeUpdateWarning, stacklevel=3)
            return size
        message = (
            f"refused: the {where}; the weights are left as they were before this batch"
            f"{'. ' + hint if hint else ''}"
            f"{'' if not size.finite else '. Raise max_update_ratio or pass on_bad_update=warn to write it anyway'}"
        )
        raise UnsafeUpdateError(message, tensor, reason, size, case_ids)
