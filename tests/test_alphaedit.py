"""AlphaEdit on tiny random models: the null-space property, the solve against the paper's
formula, the running key sum (sequential batches, checkpoints, restore) and its errors."""

from __future__ import annotations

import pytest
import torch
from test_closed_form import REQUESTS, _editor, _llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _threshold(tokenizer, cache, layer: int, quantile: float = 0.5) -> tuple[float, torch.Tensor]:
    """An eigenvalue quantile of the tiny model's key statistics (scale-free choice for the tests)."""
    from lit_edit.editors import MEMIT

    C = _editor(MEMIT, tokenizer, cache, layers=[layer]).key_statistics(layer).double()
    evals = torch.linalg.eigvalsh((C + C.T) / 2)
    return float(torch.quantile(evals, quantile)), C


def test_alphaedit_solve_is_the_paper_formula_and_lives_in_the_null_space():
    from lit_edit.closed_form import alphaedit_solve, nullspace_projection

    g = torch.Generator().manual_seed(0)
    d, e, out = 12, 3, 5
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = A @ A.T / d
    ev = torch.linalg.eigvalsh(C)
    thr = float(ev[5] + ev[6]) / 2  # 6 of 12 directions below
    P, info = nullspace_projection(C, thr)
    assert info["nullspace_dim"] == 6 and 0 < info["nullspace_energy"] < 0.5
    K = torch.randn(d, e, generator=g, dtype=torch.float64)
    R = torch.randn(out, e, generator=g, dtype=torch.float64)
    Kp = torch.randn(d, 4, generator=g, dtype=torch.float64)
    delta, cond = alphaedit_solve(K, R, P, Kp @ Kp.T, ridge=0.5)
    # Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + ridge·I)⁻¹ (AlphaEdit, eq. 15 with the ridge)
    ref = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + 0.5 * torch.eye(d, dtype=torch.float64))
    assert torch.allclose(delta, ref, atol=1e-10) and cond >= 1
    # zero on the preserved directions (eigenvalues ≥ threshold)
    evals, evecs = torch.linalg.eigh(C)
    kept = evecs[:, evals >= thr]
    assert float((delta @ kept).abs().max()) < 1e-12 * float(delta.abs().max()) + 1e-14


def test_alphaedit_leaves_outputs_on_preserved_keys_unchanged(tokenizer, cache):
    """Tolerance: ‖ΔW u‖ ≤ eps₃₂·‖W‖_F for every preserved eigenvector u: the float32 rounding of
    the stored weights (each entry rounded to within eps₃₂/2 of W + Δ) is all that may remain."""
    from lit_edit.closed_form import keys_at
    from lit_edit.editors import MEMIT, AlphaEdit

    thr, C = _threshold(tokenizer, cache, 2)
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    kept = evecs[:, evals >= thr]  # the preserved keys' span
    ed = _editor(AlphaEdit, tokenizer, cache, layers=[1, 2], nullspace_threshold=thr)
    w2 = ed.weight(2).detach().clone()
    K_before = keys_at(ed.model, tokenizer, REQUESTS, 2, ed.context_templates()).double()
    diag = ed.edit(REQUESTS)
    dW = (ed.weight(2).detach() - w2).double()
    assert float(dW.norm()) > 0 and diag["cond/layer2"] >= 1
    tol = torch.finfo(torch.float32).eps * float(w2.double().norm())
    assert float((dW @ kept).norm(dim=0).max()) <= tol
    # the edit still moves the edited keys' outputs (it is not the zero update)
    assert float((dW @ K_before.T).norm()) > 1e-3 * float(dW.norm())
    # MEMIT on the same model and requests does change the preserved directions: the check can fail
    me = _editor(MEMIT, tokenizer, cache, model=_llama(tokenizer), layers=[1, 2])
    m2 = me.weight(2).detach().clone()
    me.edit(REQUESTS)
    dM = (me.weight(2).detach() - m2).double()
    assert float((dM @ kept).norm(dim=0).max()) > 100 * tol


def test_alphaedit_running_key_sum_sequential_checkpoint_restore(tokenizer, cache):
    from lit_edit.closed_form import keys_at
    from lit_edit.editors import AlphaEdit

    thr, _ = _threshold(tokenizer, cache, 2)
    ed = _editor(AlphaEdit, tokenizer, cache, layers=[2], nullspace_threshold=thr)
    ed.edit(REQUESTS[:2])
    K1 = keys_at(ed.model, tokenizer, REQUESTS[:2], 2, ed.context_templates()).double().cpu()
    assert torch.allclose(ed.prior_keys[2], K1.T @ K1, rtol=1e-12, atol=0)
    ed.edit(REQUESTS[2:])
    K2 = keys_at(ed.model, tokenizer, REQUESTS[2:], 2, ed.context_templates()).double().cpu()
    assert torch.allclose(ed.prior_keys[2], K1.T @ K1 + K2.T @ K2, rtol=1e-12, atol=0)

    checkpoint: dict = {"state_dict": {}}
    ed.on_save_checkpoint(checkpoint)
    other = _editor(AlphaEdit, tokenizer, cache, layers=[2], nullspace_threshold=thr)
    other.on_load_checkpoint(checkpoint)
    assert torch.equal(other.prior_keys[2], ed.prior_keys[2])
    bad = {"state_dict": {}, "alphaedit_prior_keys": {2: torch.full((3, 3), float("nan"))}}
    with pytest.raises(ValueError, match="alphaedit_prior_keys"):
        other.on_load_checkpoint(bad)

    ed.restore()
    assert ed.prior_keys == {}
    single = _editor(AlphaEdit, tokenizer, cache, layers=[2], nullspace_threshold=thr, accumulate=False)
    single.edit(REQUESTS[:2])
    assert single.prior_keys == {}  # single/batched strategies: every batch is undone


def test_alphaedit_errors(tokenizer, cache):
    from lit_edit.editors import AlphaEdit

    for kwargs, match in (
        (dict(nullspace_threshold=0.0), "nullspace_threshold"),
        (dict(nullspace_threshold=-1.0), "nullspace_threshold"),
        (dict(ridge=0.0), "ridge"),
        (dict(statistics=dict(adjustment=False)), "statistics.adjustment"),
    ):
        with pytest.raises(ValueError, match=match):
            _editor(AlphaEdit, tokenizer, cache, layers=[2], **kwargs)
    ed = _editor(AlphaEdit, tokenizer, cache, layers=[2], nullspace_threshold=1e-30)
    with pytest.raises(ValueError, match="raise nullspace_threshold"):
        ed.edit(REQUESTS[:1])
