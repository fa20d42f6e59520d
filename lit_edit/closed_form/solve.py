"""Closed-form updates of an edit matrix W (``d_out × d_in``), as plain tensor functions.

All solves run in float64 with autocast off and return float64 updates ``Δ`` (``d_out × d_in``).
``C`` is the key second moment E[k kᵀ] (``d_in × d_in``); ``None`` means the identity.
Keys are columns: ``K`` is ``d_in × E``; residuals ``R`` are ``d_out × E``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)

__all__ = [
    "alphaedit_solve",
    "apply_update",
    "condition_estimate",
    "emmet_solve",
    "memit_solve",
    "nullspace_projection",
    "rome_solve",
]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def _c_solve(C: Optional[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """C⁻¹ X (identity when ``C`` is None)."""
    return X if C is None else torch.linalg.solve(_f64(C).to(X.device), X)


@torch.autocast("cpu", enabled=False)
def rome_solve(
    key: torch.Tensor,
    residual: torch.Tensor,
    C: Optional[torch.Tensor] = None,
    denominator_key: Optional[torch.Tensor] = None,
    with_denominator: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, float]]:
    """ROME's rank-one update ``Δ = Λ (C⁻¹k)ᵀ`` with ``Λ = residual / ((C⁻¹k)ᵀ k_d)``.

    Args:
        key: the (template-averaged) key k* ``(d_in,)``.
        residual: ``v* − W k_d`` ``(d_out,)``.
        denominator_key: ``k_d``; defaults to ``key`` (r-ROME: Ŵ k* = v* exactly). The
            original ROME used the bare prompt's key here.
        with_denominator: also return the denominator ``(C⁻¹k)ᵀ k_d`` (for r-ROME the squared
            C⁻¹-norm of the key, ``k*ᵀ C⁻¹ k*``): the update's norm is ``‖residual‖·‖C⁻¹k‖`` divided
            by it, so a denominator that shrinks over a sequential run is the start of a collapse.
    """
    k = _f64(key)
    kd = k if denominator_key is None else _f64(denominator_key)
    u = _c_solve(C, k[:, None])[:, 0]
    denominator = u @ kd
    delta = torch.outer(_f64(residual) / denominator, u)
    return (delta, float(denominator)) if with_denominator else delta


@torch.autocast("cpu", enabled=False)
def memit_solve(
    K: torch.Tensor, R: torch.Tensor, C: Optional[torch.Tensor], lam: float, with_condition: bool = False
) -> Union[torch.Tensor, tuple[torch.Tensor, float]]:
    """MEMIT's least-squares update ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹``.

    Minimises ``λ tr(Δ C Δᵀ) + ‖Δ K − R‖²`` (``C`` = identity when None). ``with_condition``
    also returns an estimate of the 2-norm condition number of ``A = λC + K Kᵀ``, the matrix
    the solve inverts (:func:`condition_estimate`, from the solve's own LU factors: a few
    matrix-vector products, no extra factorisation).
    """
    K64, R64 = _f64(K), _f64(R)
    d = K64.shape[0]
    Cm = torch.eye(d, dtype=torch.float64, device=K64.device) if C is None else _f64(C).to(K64.device)
    A = lam * Cm + K64 @ K64.T
    LU, pivots = torch.linalg.lu_factor(A)  # the factorisation torch.linalg.solve makes (same result, bit for bit)
    delta = R64 @ torch.linalg.lu_solve(LU, pivots, K64).T  # A symmetric: (A⁻¹ K)ᵀ = Kᵀ A⁻¹
    if not with_condition:
        return delta
    return delta, condition_estimate(A, (LU, pivots))


@torch.no_grad()
def condition_estimate(
    A: torch.Tensor, factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None, iterations: int = 32
) -> float:
    """An estimate of the 2-norm condition number ``σ_max / σ_min`` of a square matrix, cheap
    next to a factorisation: ``σ_max²`` by power iteration on ``AᵀA``, ``1/σ_min²`` by power
    iteration on ``A⁻¹A⁻ᵀ`` through the LU ``factors`` of ``A`` (``torch.linalg.lu_factor``; the
    ones the caller's solve used, else computed here), ``iterations`` steps each from a fixed
    start vector. Both Rayleigh quotients lie inside the spectrum, so the estimate never exceeds
    the true condition number and approaches it as the iterations converge (within a few percent
    on the closed-form systems); it is meant for tracking how the conditioning moves over a run
    (orders of magnitude), not as an exact value. Returns ``inf`` for a singular matrix.
    """
    A64 = _f64(A)
    LU, pivots = factors if factors is not None else torch.linalg.lu_factor(A64)
    start = torch.randn(A64.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(A64.device)

    def top(apply) -> float:
        v, value = start / start.norm(), 0.0
        for _ in range(iterations):
            w = apply(v)
            value = float(v.T @ w)
            norm = w.norm()
            if not torch.isfinite(norm) or float(norm) == 0.0:
                return math.inf if not torch.isfinite(norm) else 0.0
            v = w / norm
        return value

    largest = top(lambda v: A64.T @ (A64 @ v))  # ≤ σ_max²
    inverse = top(lambda v: torch.linalg.lu_solve(LU, pivots, torch.linalg.lu_solve(LU, pivots, v, adjoint=True)))  # ≤ 1/σ_min²
    if not (largest > 0 and inverse > 0) or not math.isfinite(inverse):
        return math.inf
    return math.sqrt(largest * inverse)


@torch.autocast("cpu", enabled=False)
def emmet_solve(
    K: torch.Tensor,
    R: torch.Tensor,
    C: Optional[torch.Tensor],
    mom2_weight: float = 1.0,
    emmet_lambda: float = 0.1,
) -> tuple[torch.Tensor, float]:
    """EMMET's equality-constrained update ``Δ = R D⁻¹ Kᵀ C'⁻¹`` with ``C' = w·C``,
    ``D = Kᵀ C'⁻¹ K + emmet_lambda·I``. Returns ``(Δ, cond(D))``.

    With ``emmet_lambda = 0`` and linearly independent keys, ``Δ K = R`` exactly. ``D`` is
    inverted in float64, falling back to the pseudo-inverse when it is singular.
    """
    K64, R64 = _f64(K), _f64(R)
    Cw = None if C is None else mom2_weight * _f64(C).to(K64.device)
    if C is None and mom2_weight != 1.0:
        Cw = mom2_weight * torch.eye(K64.shape[0], dtype=torch.float64, device=K64.device)
    A = _c_solve(Cw, K64)  # C'⁻¹ K  (d_in × E)
    D = K64.T @ A + emmet_lambda * torch.eye(K64.shape[1], dtype=torch.float64, device=K64.device)
    cond = float(torch.linalg.cond(D))
    try:
        X = torch.linalg.solve(D, A.T)  # D⁻¹ Kᵀ C'⁻¹  (E × d_in)
        if not torch.isfinite(X).all():
            raise RuntimeError("non-finite solve")
    except RuntimeError:
        log.warning("EMMET: D is singular (cond %.3g); using the pseudo-inverse", cond)
        X = torch.linalg.pinv(D) @ A.T
    return R64 @ X, cond


@torch.autocast("cpu", enabled=False)
def nullspace_projection(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, dict[str, float]]:
    """AlphaEdit's projection ``P = U₀ U₀ᵀ`` onto the eigenvectors of ``C`` (``E[k kᵀ]`` of the
    preserved keys) whose eigenvalues are below ``threshold``: an update ``Δ = Δ P`` leaves
    ``Δ k`` = 0 for every ``k`` in the span of the other eigenvectors.

    Returns ``(P, info)`` with ``info`` = ``nullspace_dim`` (rank of ``P``) and
    ``nullspace_energy`` (the share of ``tr C`` that lies in the projected subspace, i.e. how much
    of the preserved keys' energy an update may still touch). Raises ``ValueError`` when no
    eigenvalue is below the threshold (``P = 0`` could write nothing).
    """
    C64 = _f64(C)
    C64 = (C64 + C64.T) / 2
    evals, evecs = torch.linalg.eigh(C64)
    small = evals < threshold
    n = int(small.sum())
    if n == 0:
        raise ValueError(
            f"nullspace_threshold {threshold:g} is below every eigenvalue of the key statistics "
            f"(smallest {float(evals.min()):.3g}): the projection would be zero; raise nullspace_threshold"
        )
    U = evecs[:, small]
    energy = float(evals[small].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-300))
    return U @ U.T, {"nullspace_dim": float(n), "nullspace_energy": energy}


@torch.autocast("cpu", enabled=False)
def alphaedit_solve(
    K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, prior: Optional[torch.Tensor], ridge: float
) -> tuple[torch.Tensor, float]:
    """AlphaEdit's projected update ``Δ = X ᵀ`` with
    ``(P (K Kᵀ + K_p K_pᵀ) + ridge·I) X = P K Rᵀ``.

    ``prior`` is ``K_p K_pᵀ`` (``d_in × d_in``), the keys of earlier edits (``None``: no earlier
    edit). ``X = P X`` holds exactly (``X = P (K Rᵀ − M X) / ridge``), so ``Δ P = Δ``: the
    update is zero on the preserved keys' span. Returns ``(Δ, cond)`` with ``cond`` the
    condition number of the system matrix, estimated from the solve's LU factors
    (:func:`condition_estimate`).
    """
    K64, R64, P64 = _f64(K), _f64(R), _f64(P).to(K.device)
    M = K64 @ K64.T
    if prior is not None:
        M = M + _f64(prior).to(K64.device)
    A = P64 @ M + ridge * torch.eye(M.shape[0], dtype=torch.float64, device=K64.device)
    LU, pivots = torch.linalg.lu_factor(A)  # the factorisation torch.linalg.solve makes (same result, bit for bit)
    X = torch.linalg.lu_solve(LU, pivots, P64 @ K64 @ R64.T)  # d_in × d_out
    return X.T, condition_estimate(A, (LU, pivots))


@torch.no_grad()
def apply_update(weight: torch.Tensor, delta: torch.Tensor, conv1d: bool = False) -> None:
    """Add ``Δ`` (``d_out × d_in``) to a weight in place (stored ``(in, out)`` for GPT-2 Conv1D)."""
    upd = delta.T if conv1d else delta
    if tuple(upd.shape) != tuple(weight.shape):
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)} (conv1d={conv1d})")
    weight.add_(upd.to(device=weight.device, dtype=weight.dtype))
