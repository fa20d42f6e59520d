"""Guards on the updates written into a model, caches that verify what they read, and the
true-precision plugins (bf16-true, 16-true, 64-true) on tiny random models."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama, write_corpus

from lit_edit.data import EditDataModule
from lit_edit.data.request import EditRequest
from lit_edit.guards import DEFAULT_MAX_UPDATE_RATIO, UnsafeUpdateError, UnsafeUpdateWarning, UpdateGuard, update_size

REQUESTS = [
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English", case_id="cf-0"),
    EditRequest(prompt="Paris is the capital of", subject="Paris", target_new="Italy", case_id="cf-1"),
    EditRequest(prompt="The Eiffel Tower is located in", subject="Eiffel Tower", target_new="Rome", case_id="cf-2"),
]
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, max_epochs=2)
    return L.Trainer(**{**args, **kw})


def closed_form(cls, tokenizer, directory, model=None, **kw):
    statistics = {"n_samples": 40, "max_length": 32, "batch_size": 16, "corpus": write_corpus(directory), **kw.pop("statistics", {})}
    values = {"steps": 2, **kw.pop("values", {})}
    model = model if model is not None else make_tiny_llama(len(tokenizer), layers=3)
    return cls(model=model, tokenizer=tokenizer, values=values, statistics=statistics, **kw)


def finetune(cls, tokenizer, model=None, **kw):
    from lit_edit.editors import LocFTBF

    kw = {"target_modules": ["mlp.down_proj"], "layers_to_transform": [1], "lr": 1e-2, **kw}
    model = model if model is not None else make_tiny_llama(len(tokenizer))
    return (cls or LocFTBF)(model=model, tokenizer=tokenizer, **kw)


# --------------------------------------------------------------------------- the guard itself


def test_update_size_and_guard_policies():
    w = torch.full((4, 4), 0.5)
    size = update_size("w", w, torch.full((4, 4), 0.05))
    assert math.isclose(size.relative_norm, 0.1, rel_tol=1e-6) and math.isclose(size.ratio, 0.1, rel_tol=1e-6)
    assert not update_size("w", w, torch.full((4, 4), float("nan"))).finite
    assert not update_size("w", w.half(), torch.full((4, 4), 1e6)).finite  # overflows float16 when written
    spike = torch.zeros(4, 4)
    spike[0, 0] = 5.0  # 2.5x the weight in norm, 10x its largest element
    assert update_size("w", w, spike).relative_max == pytest.approx(10.0)

    guard = UpdateGuard(max_update_ratio=2.0)
    with pytest.raises(UnsafeUpdateError, match=r"w for request\(s\) \['a', 'b'\].*too large.*max_update_ratio 2") as err:
        guard.check("w", w, spike, ["a", "b"])
    assert err.value.case_ids == ["a", "b"] and err.value.tensor == "w" and err.value.size.relative_max == pytest.approx(10.0)
    with pytest.warns(UnsafeUpdateWarning, match="writing it anyway"):
        UpdateGuard(2.0, "warn").check("w", w, spike, ["a"])
    with pytest.raises(UnsafeUpdateError, match="not finite"):  # never written, whatever the policy
        UpdateGuard(None, "warn").check("w", w, torch.full((4, 4), float("inf")), ["a"])
    assert UpdateGuard(None).check("w", w, 100 * spike).ratio == pytest.approx(1000.0)  # no limit: finiteness only
    for bad in (0, -1.0, float("nan"), "big", True):
        with pytest.raises(ValueError, match="max_update_ratio"):
            UpdateGuard(bad)
    with pytest.raises(ValueError, match="on_bad_update"):
        UpdateGuard(2.0, "ignore")


# --------------------------------------------------------------------------- closed-form editors


def _zero_statistics_at(editor, layer):
    """Make the key statistics of ``layer`` all zero (as a broken cache or λ = 0 would)."""
    real = editor.key_statistics

    def patched(at):
        C = real(at)
        return torch.zeros_like(C) if at == layer else C

    editor.key_statistics = patched


def test_memit_refused_layer_restores_the_batch_bit_exactly(tokenizer, cache):
    from lit_edit.editors import MEMIT

    ed = closed_form(MEMIT, tokenizer, cache, layers=[1, 2], statistics={"update_weight": 10.0})
    ed.edit(REQUESTS[:1])  # a first, sound batch: kept (sequential editing)
    after_first = snapshot(ed.model)
    touched = sorted(ed.touched)
    written = []
    real_write = ed.write_update

    def spy(layer, delta, requests):
        size = real_write(layer, delta, requests)
        written.append(layer)
        return size

    ed.write_update = spy
    _zero_statistics_at(ed, 2)  # layer 1 is written, then layer 2's update explodes
    with pytest.raises(UnsafeUpdateError) as err:
        ed.edit(REQUESTS[1:])
    message = str(err.value)
    assert written == [1]
    assert "model.layers.2.mlp.down_proj.weight" in message and "'cf-1', 'cf-2'" in message
    assert "too large" in message or "not finite" in message
    assert same(ed.model, after_first)  # layer 1 of the refused batch is back, bit for bit
    assert sorted(ed.touched) == touched

    fresh = closed_form(MEMIT, tokenizer, cache, layers=[1, 2], statistics={"update_weight": 10.0})
    before = snapshot(fresh.model)
    _zero_statistics_at(fresh, 2)
    with pytest.raises(UnsafeUpdateError):
        fresh.edit(REQUESTS)
    assert same(fresh.model, before) and fresh.touched == []  # nothing recorded for a refused first batch


def test_memit_zero_statistics_refused_or_warned(tokenizer, cache):
    from lit_edit.editors import EMMET, MEMIT

    ed = closed_form(MEMIT, tokenizer, cache, layers=[1])
    _zero_statistics_at(ed, 1)  # λC + K Kᵀ is singular: |ΔW| explodes
    before = snapshot(ed.model)
    with pytest.raises(UnsafeUpdateError, match=r"model.layers.1.mlp.down_proj.weight for request\(s\) \['cf-0', 'cf-1', 'cf-2'\]"):
        ed.edit(REQUESTS)
    assert same(ed.model, before)

    warned = closed_form(EMMET, tokenizer, cache, model=ed.model, layers=[1], on_bad_update="warn", max_update_ratio=1e-6)
    with pytest.warns(UnsafeUpdateWarning, match="too large"):
        diag = warned.edit(REQUESTS)
    assert diag["update_ratio"] > 1e-6 and not same(warned.model, before)
    assert warned.hparams["on_bad_update"] == "warn" and warned.hparams["max_update_ratio"] == 1e-6
    assert closed_form(MEMIT, tokenizer, cache, model=ed.model).hparams["max_update_ratio"] == DEFAULT_MAX_UPDATE_RATIO


def test_rome_on_zero_keys_refuses_nan(tokenizer, cache):
    from lit_edit.editors import ROME

    model = make_tiny_llama(len(tokenizer), layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.zero_()  # silu(0) = 0: every key of block 1 is zero
    ed = closed_form(ROME, tokenizer, cache, model=model, layers=1, statistics={"adjustment": False}, on_bad_update="warn")
    before = snapshot(model)
    with pytest.raises(UnsafeUpdateError, match=r"\['cf-0'\].*not finite"):
        ed.edit(REQUESTS[:1])
    assert same(model, before) and ed.touched == []
    # with key statistics on, the degenerate layer is refused before any update is computed
    with pytest.raises(ValueError, match="all zero"):
        closed_form(ROME, tokenizer, cache, model=model, layers=1).edit(REQUESTS[:1])


def test_rome_refused_second_request_restores_the_first(tokenizer, cache):
    from lit_edit.editors import ROME

    ed = closed_form(ROME, tokenizer, cache, layers=1, max_update_ratio=1e9)
    before = snapshot(ed.model)
    calls = []
    real = ed.guard.check

    def check(tensor, weight, delta, case_ids=(), **kw):
        calls.append(list(case_ids))
        return real(tensor, weight, delta * (math.nan if len(calls) == 2 else 1.0), case_ids, **kw)

    ed.guard.check = check
    with pytest.raises(UnsafeUpdateError, match=r"\['cf-1'\]"):
        ed.edit(REQUESTS[:2])
    assert calls == [["cf-0"], ["cf-1"]]
    assert same(ed.model, before) and ed.touched == []


# --------------------------------------------------------------------------- fine-tuning editors


def test_locft_bf_exploding_lr_refused_at_first_step(tokenizer):
    ed = finetune(None, tokenizer, lr=1e3)
    before = snapshot(ed.model)
    with pytest.raises(UnsafeUpdateError) as err:
        trainer().fit(ed, datamodule=EditDataModule(requests=REQUESTS, batch_size=2, shuffle=False))
    message = str(err.value)
    assert DOWN1 in message and "'cf-0', 'cf-1'" in message and "max_update_ratio" in message and "lr" in message
    assert err.value.size.ratio > 100
    assert same(ed.model, before)  # the pre-step weights are back


def test_locft_bf_nan_step_refused_and_warn_mode_continues(tokenizer):
    ed = finetune(None, tokenizer, on_bad_update="warn")
    real = ed.edit_loss
    state = {"calls": 0}

    def loss(requests):
        state["calls"] += 1
        out = real(requests)
        return out * math.nan if state["calls"] == 3 else out  # the third step's gradient is NaN

    ed.edit_loss = loss
    steps = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            steps.append(dict(module.model.named_parameters())[DOWN1].detach().clone())

    with pytest.raises(UnsafeUpdateError, match=r"not finite"):
        trainer(max_epochs=5, callbacks=[Probe()]).fit(ed, datamodule=EditDataModule(requests=REQUESTS, batch_size=3, shuffle=False))
    w = dict(ed.model.named_parameters())[DOWN1].detach()
    assert len(steps) == 3 and not torch.isfinite(steps[2]).all()  # callbacks see the NaN step before the editor's check
    assert torch.equal(w, steps[1])  # the editor put back the value from before the NaN step

    big = finetune(None, tokenizer, lr=1.0, on_bad_update="warn")
    with pytest.warns(UnsafeUpdateWarning, match="change since the original"):
        trainer(max_epochs=2).fit(big, datamodule=EditDataModule(requests=REQUESTS, batch_size=3))
    assert big.optimizer_steps == 2


def test_refit_after_restore_is_guarded(tokenizer, tmp_path):
    ed = finetune(None, tokenizer)
    before = snapshot(ed.model)
    trainer(max_epochs=1).fit(ed, datamodule=EditDataModule(requests=REQUESTS[:1]))
    ed.restore()  # forgets the record; the next fit records the originals again
    ed.hparams["lr"] = 1e3
    with pytest.raises(UnsafeUpdateError, match="too large"):
        trainer(max_epochs=1).fit(ed, datamodule=EditDataModule(requests=REQUESTS[:1]))
    assert same(ed.model, before) and ed.touched == [DOWN1]


def test_depth_first_exploding_lr_refused(tokenizer):
    from lit_edit.editors import DepthFirstFT

    ed = finetune(DepthFirstFT, tokenizer, lr=1e3, steps=3)
    before = snapshot(ed.model)
    with pytest.raises(UnsafeUpdateError, match=r"\['cf-0'\].*too large"):
        trainer(max_epochs=1).fit(ed, datamodule=EditDataModule(requests=REQUESTS, batch_size=1, shuffle=False))
    assert same(ed.model, before)


def test_finetune_refuses_float16_adam_eps_and_bad_linf_eps(tokenizer):
    from lit_edit.editors import LocFTBF

    with pytest.raises(ValueError, match=r"adam_eps=1e-08 underflows in float16"):
        finetune(LocFTBF, tokenizer, dtype="float16")
    finetune(LocFTBF, tokenizer, dtype="float16", adam_eps=1e-4)  # representable: accepted
    finetune(LocFTBF, tokenizer, dtype="bfloat16")  # bfloat16 has float32's range
    for bad in (-0.1, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="linf_eps"):
            finetune(LocFTBF, tokenizer, linf_eps=bad)
    for bad in (0.0, float("nan")):
        with pytest.raises(ValueError, match="max_update_ratio"):
            finetune(LocFTBF, tokenizer, max_update_ratio=bad)


# --------------------------------------------------------------------------- statistics and template caches


def test_weights_fingerprint_covers_what_the_keys_depend_on(tokenizer):
    from lit_edit.models import weights_fingerprint

    a = make_tiny_llama(len(tokenizer), seed=0, layers=3)
    b = make_tiny_llama(len(tokenizer), seed=0, layers=3)
    b.config.name_or_path = "another-name"
    assert weights_fingerprint(a) == weights_fingerprint(b)  # same weights, any name
    assert weights_fingerprint(a, 1) != weights_fingerprint(a)
    before = {k: weights_fingerprint(a, k) for k in (0, 1)}
    with torch.no_grad():
        a.model.layers[2].mlp.up_proj.weight[0, 0] += 1.0  # after block 1: no effect up to it
        assert weights_fingerprint(a, 1) == before[1]
        a.model.layers[1].mlp.down_proj.weight.view(-1)[5] += 1e-6  # one element of block 1
    assert weights_fingerprint(a, 1) != before[1] and weights_fingerprint(a, 0) == before[0]
    assert weights_fingerprint(a, 1, exclude="model.layers.1.mlp.down_proj") == weights_fingerprint(
        b, 1, exclude="model.layers.1.mlp.down_proj")  # the hooked module's own weights are not its keys'


def test_same_name_different_weights_never_share_a_cache(tokenizer, cache):
    from lit_edit.closed_form import ContextTemplates, TemplateSpec
    from lit_edit.stats import second_moment

    corpus = write_corpus(cache)
    first = make_tiny_llama(len(tokenizer), seed=0)
    second = make_tiny_llama(len(tokenizer), seed=1)
    second.config.name_or_path = first.config.name_or_path  # e.g. saved one after another at one path
    a = second_moment(first, tokenizer, 1, corpus=corpus, n_samples=20, max_length=32)
    b = second_moment(second, tokenizer, 1, corpus=corpus, n_samples=20, max_length=32)
    assert not a.cached and not b.cached and a.key.model == b.key.model and a.key.digest() != b.key.digest()
    assert not torch.allclose(a.mom2, b.mom2)
    assert len(list((Path(cache) / "stats").glob("*.pt"))) == 2
    assert second_moment(second, tokenizer, 1, corpus=corpus, n_samples=20, max_length=32).cached

    spec = TemplateSpec(groups=((3, 2),))
    ContextTemplates().get(first, tokenizer, spec)
    ContextTemplates().get(second, tokenizer, spec)
    assert len(list((Path(cache) / "templates").glob("*.json"))) == 2


def _damage(kind: str, path: Path) -> None:
    data = torch.load(path, weights_only=True)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        return
    if kind == "nan":
        data["mom2"][0, 0] = math.nan
    elif kind == "zero":
        data["mom2"].zero_()
    elif kind == "shape":
        data["mom2"] = data["mom2"][:-1, :-1].clone()
    elif kind == "count":
        data["count"] = 0
    torch.save(data, path)


@pytest.mark.parametrize(
    "kind, why",
    [("truncated", "cannot be read"), ("nan", "NaN"), ("zero", "all zero"), ("shape", "shape"), ("count", "token count"),
     ("sidecar", "cannot be read")],
)
def test_damaged_statistics_cache_is_recomputed(tokenizer, cache, caplog, kind, why):
    from lit_edit.stats import second_moment, stats_path

    model = make_tiny_llama(len(tokenizer))
    args = dict(corpus=write_corpus(cache), n_samples=20, max_length=32)
    good = second_moment(model, tokenizer, 1, **args)
    path = stats_path(good.key)
    if kind == "sidecar":
        path.with_suffix(".json").write_text('{"key": ')
    else:
        _damage(kind, path)
    with caplog.at_level(logging.WARNING, logger="lit_edit.stats"):
        again = second_moment(model, tokenizer, 1, **args)
    assert not again.cached and torch.equal(again.mom2, good.mom2)
    assert f"statistics cache {path} is unusable" in caplog.text and why in caplog.text and "recomputing" in caplog.text
    assert second_moment(model, tokenizer, 1, **args).cached  # repaired on disk


def test_second_moment_option_validation(tokenizer, cache):
    from lit_edit.stats import second_moment

    model = make_tiny_llama(len(tokenizer))
    for option, value in (("n_samples", 0), ("n_samples", -3), ("max_length", 1), ("max_length", 0)):
        with pytest.raises(ValueError, match=option):
            second_moment(model, tokenizer, 1, corpus=write_corpus(cache), **{option: value})


def test_damaged_template_cache_is_resampled(tokenizer, cache, caplog):
    from lit_edit.closed_form import ContextTemplates, TemplateSpec

    model = make_tiny_llama(len(tokenizer))
    spec = TemplateSpec(groups=((3, 2),))
    groups = ContextTemplates().get(model, tokenizer, spec)
    (path,) = (Path(cache) / "templates").glob("*.json")
    path.write_text(path.read_text()[:40])
    with caplog.at_level(logging.WARNING, logger="lit_edit.closed_form.tokens"):
        assert ContextTemplates().get(model, tokenizer, spec) == groups
    assert "unusable (it cannot be read" in caplog.text
    # an editor keeps the templates it sampled while its edits change the weights
    templates = ContextTemplates()
    first = templates.get(model, tokenizer, spec)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.01)
    assert templates.get(model, tokenizer, spec) is first


def test_study_unedited_figures_keyed_by_weights(tokenizer, tmp_path, monkeypatch):
    from lit_edit.evaluation import Evaluator
    from lit_edit.study import Study

    calls = []
    original = Evaluator.evaluate

    def counting(self, model, *args, **kwargs):
        calls.append(model)
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", counting)

    def study(model):
        s = Study.__new__(Study)
        s.model, s.tokenizer, s.out, s.evaluator = model, tokenizer, tmp_path, Evaluator(protocols=["token_accuracy"])
        return s

    first = make_tiny_llama(len(tokenizer), seed=0)
    before = study(first).unedited(REQUESTS)
    again = study(first).unedited(REQUESTS)  # same name and weights: read back, figures and reference
    assert len(calls) == 1 and again.figures == before.figures and again.reference.num_requests == len(REQUESTS)
    other = make_tiny_llama(len(tokenizer), seed=1)  # same name, other weights: evaluated again
    other.config.name_or_path = first.config.name_or_path
    study(other).unedited(REQUESTS)
    assert len(calls) == 2


# --------------------------------------------------------------------------- true-precision plugins


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_locft_bf_under_true_precision(tokenizer, tmp_path, precision, dtype):
    from lit_edit.edits import apply_edit

    ed = finetune(None, tokenizer)
    w0 = dict(ed.model.named_parameters())[DOWN1].detach().clone()
    tr = trainer(max_epochs=3, precision=precision)
    tr.fit(ed, datamodule=EditDataModule(requests=REQUESTS, batch_size=3))
    assert math.isfinite(float(tr.callback_metrics["train/loss"])) and ed.optimizer_steps > 0
    w = dict(ed.model.named_parameters())[DOWN1].detach()
    assert w.dtype == dtype and not torch.equal(w, w0.to(dtype))  # the edit is written, in the plugin's dtype
    ed.save_edit(tmp_path / "edit")
    base = make_tiny_llama(len(tokenizer)).to(dtype)  # the base, loaded in that dtype, takes the edit
    apply_edit(base, tmp_path / "edit")
    assert torch.equal(dict(base.named_parameters())[DOWN1], w)
    ed.restore()
    assert torch.equal(dict(ed.model.named_parameters())[DOWN1], w0.to(dtype))


def test_locft_bf_16_true_needs_a_representable_adam_eps(tokenizer):
    with pytest.raises(ValueError, match="adam_eps"):
        trainer(precision="16-true").fit(finetune(None, tokenizer), datamodule=EditDataModule(requests=REQUESTS))


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_closed_form_solves_in_float64_under_true_precision(tokenizer, cache, precision):
    from lit_edit.editors import MEMIT

    ed = closed_form(MEMIT, tokenizer, cache, layers=[1, 2], statistics={"update_weight": 10.0})
    seen = []
    real = ed.solve

    def solve(K, R, C):
        delta, extra = real(K, R, C)
        seen.append((torch.get_default_dtype(), K.dtype, R.dtype, C.dtype, delta.dtype))
        return delta, extra

    ed.solve = solve
    trainer(max_epochs=1, precision=precision).fit(ed, train_dataloaders=torch.utils.data.DataLoader(REQUESTS, batch_size=3, collate_fn=list))
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, torch.float64, torch.float64) for s in seen)
    assert sorted(ed.touched) == [ed.weight_name(1), ed.weight_name(2)] and "edit/update_ratio" in ed.trainer.callback_metrics
