"""Retention curves of sequential runs (``RetentionCurve``) and the closed-form diagnostics they carry.

Rows at every ``every`` committed edits whose figures equal an ``Evaluator`` run by hand on the
same model state; the CSV and plot naming the run; a curve that survives a real kill and resume
with no row lost or repeated; replayed batches not applied twice; the solve diagnostics (MEMIT's
condition number, ROME's denominator) against hand computations.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama, write_corpus

from lit_edit.data import EditDataModule, EditRequest, PromptAnswer
from lit_edit.evaluation import Evaluator, RetentionCurve
from lit_edit.evaluation.metrics import harmonic_mean
from lit_edit.evaluation.retention import LEADING_COLUMNS, edit_view, locality_view, scored_sample

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
PPL_TEXTS = ["the cat sat on the mat while the dog ran in the park", "a quick brown fox jumps over the lazy dog again"]
SUBJECTS = [("Eiffel Tower", "Rome"), ("Danielle Darrieux", "Berlin"), ("Apple", "Madrid"), ("Toyota", "Oslo"),
            ("Lionel Messi", "Lima"), ("Mount Fuji", "Cairo")]


def _requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(
            prompt=f"{s} is located in", subject=s, target_new=t, ground_truth="Paris",
            paraphrase_prompts=(f"Where is {s}? It is in",),
            locality=(PromptAnswer(f"The capital of country {i} is", "Tokyo"),), case_id=i,
        )
        for i, (s, t) in enumerate(SUBJECTS[:n])
    ]


def _rome(tokenizer, **kw):
    from lit_edit.editors import ROME

    return ROME(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, layers=[1], values={"steps": 3},
                statistics={"adjustment": False}, templates={"max_per_group": 2}, **kw)


def _trainer(callbacks, **kw) -> L.Trainer:
    from lit_edit.editors import ROME

    return L.Trainer(**{**ROME.trainer_defaults, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "callbacks": callbacks, **kw})


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


class _Logger(L.pytorch.loggers.Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict[str, float]] = []

    @property
    def name(self):
        return "probe"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append(dict(metrics))


class _RecordAt(L.Callback):
    """Calls ``record(module)`` when ``curve`` has 2 and 4 edits applied and at the end of training."""

    def __init__(self, curve):
        self.curve = curve

    def on_edits_committed(self, trainer, module, committed):
        if len(self.curve.applied) in (2, 4):
            self.record(module)

    def on_train_end(self, trainer, module):
        self.record(module)

    def record(self, module):
        raise NotImplementedError


def test_rows_every_k_equal_an_evaluator_run_by_hand(tokenizer, tmp_path, cache):
    """Rows at 0, 2, 4 and a last one at 5 edits; every figure (edits so far, first chunk, fixed
    locality set, perplexity, S) equals an Evaluator run by hand at the same moment, the
    cumulative update norm equals ‖W − W₀‖ by hand; the CSV and plot name the run; the loggers
    get each row."""
    requests = _requests(5)
    editor = _rome(tokenizer)
    w0 = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    settings = dict(batch_size=8, max_new_tokens=3, ppl_corpus=PPL_TEXTS, ppl_texts=2, ppl_max_length=32)
    protocols = ["probability", "token_accuracy", "generation", "perplexity"]
    curve = RetentionCurve(every=2, protocols=protocols, first_chunk=True, path=tmp_path / "curve.csv", **settings)
    hand = Evaluator(protocols, **settings)
    seen: list[tuple[int, dict[str, float], float]] = []

    class ByHand(_RecordAt):  # runs after the curve's hooks (callbacks are called in order)
        reference = None

        def on_train_start(self, trainer, module):
            loc = hand.with_protocols(["probability", "token_accuracy", "generation"])
            self.reference = loc.evaluate(module.model, module.tokenizer, locality_view(requests)).reference

        def record(self, module):
            applied = list(curve.applied)
            assert [r.case_id for r in applied] == list(range(len(applied)))
            edits = hand.with_protocols(["probability", "token_accuracy", "generation"]).evaluate(
                module.model, module.tokenizer, edit_view(applied)).figures
            first = hand.with_protocols(["probability", "token_accuracy", "generation"]).evaluate(
                module.model, module.tokenizer, edit_view(applied[:2])).figures
            loc = hand.evaluate(module.model, module.tokenizer, locality_view(requests), self.reference).figures
            want = {k: v for k, v in edits.items() if k in ("prob/ES", "prob/EM", "prob/PS", "prob/PM", "tok_acc/reliability",
                                                            "tok_acc/generalization", "gen_em/reliability", "gen_em/generalization")}
            want.update({f"first/{k}": first[k] for k in want})
            want.update({k: loc[k] for k in ("prob/NS", "prob/NM", "tok_acc/locality", "gen_em/locality",
                                             "gen_em/locality_agreement", "ppl/texts")})
            want["prob/S"] = harmonic_mean([want["prob/ES"], want["prob/PS"], want["prob/NS"]])
            want["first/prob/S"] = harmonic_mean([want["first/prob/ES"], want["first/prob/PS"], want["prob/NS"]])
            params = dict(module.model.named_parameters())
            norm = math.sqrt(sum(float((params[n].double() - w0[n].double()).pow(2).sum()) for n in module.touched))
            seen.append((len(applied), want, norm))

    logger = _Logger()
    trainer = _trainer([curve, ByHand(curve)], logger=logger)
    trainer.fit(editor, datamodule=EditDataModule(requests=requests, batch_size=1, shuffle=False))

    assert [r["edits_applied"] for r in curve.rows] == [0, 2, 4, 5]
    assert [s[0] for s in seen] == [2, 4, 5]
    for row, (n, want, norm) in zip(curve.rows[1:], seen):
        assert row["edits_applied"] == n
        got = {k: row[k] for k in want}
        assert got == want  # exactly: the same computation on the same weights
        assert row["update_norm_total"] == pytest.approx(norm, rel=1e-12)
        assert row["edit/denominator_min"] > 0 and "edit/update_norm" in row
    base = curve.rows[0]
    assert base["update_norm_total"] == 0.0 and base["tok_acc/locality"] == 1.0 and "prob/ES" not in base

    rows = _read(tmp_path / "curve.csv")
    header = list(rows[0])
    assert tuple(header[: len(LEADING_COLUMNS)]) == LEADING_COLUMNS
    assert [int(r["edits_applied"]) for r in rows] == [0, 2, 4, 5]
    for r in rows:
        assert (r["editor"], r["strategy"], r["batch_size"], r["timing"], r["model"], r["data"]) == (
            "ROME", "sequential", "1", "retention", "tiny-llama-seed0", "5 given requests")
    assert float(rows[2]["prob/ES"]) == curve.rows[2]["prob/ES"] and rows[0]["prob/ES"] == ""  # floats written exactly
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [c for c in logger.calls if "retention/edits_applied" in c]
    assert [c["retention/edits_applied"] for c in logged] == [0, 2, 4, 5]
    assert logged[-1]["retention/prob/ES"] == curve.rows[-1]["prob/ES"]


def test_scored_sample_is_uniform_stable_and_fixed_by_the_requests():
    """applied_limit's sample: all edits up to the limit; then the limit of lowest hash priority,
    in applied order, the same for any copy of the requests; an edit leaves it only for a newer
    one of lower priority; over many edits every position is drawn about equally."""
    reqs = [EditRequest(prompt=f"p{i}", subject=f"s{i}", target_new="t", case_id=i) for i in range(400)]
    assert scored_sample(reqs[:5], 8) == reqs[:5] and scored_sample(reqs[:5], None) == reqs[:5]
    previous = scored_sample(reqs[:8], 8)
    for n in range(9, 400):
        now = scored_sample(reqs[:n], 8)
        assert len(now) == 8 and [r.case_id for r in now] == sorted(r.case_id for r in now)
        left = [r for r in previous if r not in now]
        assert len(left) <= 1 and (not left or reqs[n - 1] in now)  # only the newest edit displaces one
        previous = now
    copies = [EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_new, case_id=r.case_id) for r in reqs]
    assert [r.case_id for r in scored_sample(copies, 50)] == [r.case_id for r in scored_sample(reqs, 50)]
    halves = [sum(r.case_id < 200 for r in scored_sample(reqs, 100))]
    assert 30 <= halves[0] <= 70  # a uniform draw of 100 from 400: about 50 from each half


def test_applied_limit_rows_score_the_sample(tokenizer, tmp_path, cache):
    """With applied_limit, each row's edit figures equal an Evaluator run by hand on the sample
    (and edits_scored counts it); the first chunk is still all of the first ``every`` edits."""
    requests = _requests(5)
    editor = _rome(tokenizer)
    settings = dict(batch_size=8, max_new_tokens=3, ppl_corpus=PPL_TEXTS, ppl_texts=2, ppl_max_length=32)
    curve = RetentionCurve(every=2, protocols=["probability", "perplexity"], first_chunk=True, applied_limit=3,
                           path=tmp_path / "curve.csv", plot=False, **settings)
    hand = Evaluator(["probability"], **settings)
    seen: list[tuple[int, dict[str, float]]] = []

    class ByHand(_RecordAt):
        def record(self, module):
            sample = scored_sample(curve.applied, 3)
            figures = hand.evaluate(module.model, module.tokenizer, edit_view(sample)).figures
            first = hand.evaluate(module.model, module.tokenizer, edit_view(curve.applied[:2])).figures
            seen.append((len(sample), {"prob/ES": figures["prob/ES"], "prob/EM": figures["prob/EM"],
                                       "first/prob/EM": first["prob/EM"]}))

    _trainer([curve, ByHand(curve)]).fit(editor, datamodule=EditDataModule(requests=requests, batch_size=1, shuffle=False))
    rows = curve.rows[1:]
    assert [r["edits_applied"] for r in rows] == [2, 4, 5]
    assert [r["edits_scored"] for r in rows] == [2, 3, 3] == [n for n, _ in seen]
    for row, (_, want) in zip(rows, seen):
        assert {k: row[k] for k in want} == want
    assert [int(r["edits_scored"]) for r in _read(tmp_path / "curve.csv")[1:]] == [2, 3, 3]


def test_memit_batches_carry_condition_numbers(tokenizer, cache):
    """Sequential-batched MEMIT: rows name the strategy and batch size, and carry the last batch's
    condition number of λC + KKᵀ (``edit/cond_max``, the largest over the layers)."""
    from lit_edit.editors import MEMIT

    editor = MEMIT(model=make_tiny_llama(len(tokenizer), layers=3), tokenizer=tokenizer, layers=[0, 1], values={"steps": 2},
                   statistics={"n_samples": 30, "max_length": 32, "batch_size": 16, "corpus": write_corpus(cache),
                               "update_weight": 1.0}, templates={"max_per_group": 1})
    curve = RetentionCurve(every=2, protocols=["probability"], plot=False, path=cache / "memit.csv")
    _trainer([curve]).fit(editor, datamodule=EditDataModule(requests=_requests(4), batch_size=2, shuffle=False))
    assert [r["edits_applied"] for r in curve.rows] == [0, 2, 4]
    last = curve.rows[-1]
    assert (last["strategy"], last["batch_size"]) == ("sequential_batched", 2)
    assert last["edit/cond_max"] == max(last["edit/cond/layer0"], last["edit/cond/layer1"]) > 1
    assert last["edit/cond_max"] == editor.last_diagnostics["cond_max"]


def test_solve_diagnostics_match_hand_computation():
    """MEMIT's and AlphaEdit's solves are unchanged by the condition estimate (bit for bit
    against torch.linalg.solve) and the estimate is within 2% of the exact 2-norm condition
    number of the system matrix, never above it; ROME's denominator is k*ᵀ C⁻¹ k_d."""
    from lit_edit.closed_form.solve import alphaedit_solve, condition_estimate, memit_solve, nullspace_projection, rome_solve

    g = torch.Generator().manual_seed(0)
    d, e = 96, 5
    B = torch.randn(d, 2 * d, dtype=torch.float64, generator=g) * torch.logspace(0, -3, 2 * d, dtype=torch.float64)
    C = B @ B.T / d
    K = torch.randn(d, e, dtype=torch.float64, generator=g)
    R = torch.randn(16, e, dtype=torch.float64, generator=g)
    delta, cond = memit_solve(K, R, C, 0.5, with_condition=True)
    A = 0.5 * C + K @ K.T
    assert torch.equal(delta, memit_solve(K, R, C, 0.5)) and torch.equal(delta, R @ torch.linalg.solve(A, K).T)
    exact = float(torch.linalg.cond(A))
    assert exact * 0.98 < cond <= exact * (1 + 1e-9)
    P, _ = nullspace_projection(C, float(torch.linalg.eigvalsh(C)[d // 2]))
    prior = torch.randn(d, 7, dtype=torch.float64, generator=g)
    system = P @ (K @ K.T + prior @ prior.T) + 10 * torch.eye(d, dtype=torch.float64)  # not symmetric
    delta, cond = alphaedit_solve(K, R, P, prior @ prior.T, 10.0)
    assert torch.equal(delta, torch.linalg.solve(system, P @ K @ R.T).T)
    exact = float(torch.linalg.cond(system))
    assert exact * 0.98 < cond <= exact * (1 + 1e-9)
    assert condition_estimate(torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))) == pytest.approx(4.0)
    k, kd, r = K[:, 0], K[:, 1], R[:, 0]
    delta, denominator = rome_solve(k, r, C, denominator_key=kd, with_denominator=True)
    assert denominator == pytest.approx(float(k @ torch.linalg.solve(C, kd)), rel=1e-10)
    assert torch.equal(delta, rome_solve(k, r, C, denominator_key=kd))


def test_replayed_batch_is_not_applied_twice(tokenizer, cache):
    """A sequential closed-form fit handed a batch it already applied (as Lightning may after a
    resume) skips it: the weights equal a fit without the repeat, bit for bit, the edit is
    announced once, and checkpoints record the applied requests."""
    requests = _requests(2)
    commits: list[list[int]] = []

    class Count(L.Callback):
        def on_edits_committed(self, trainer, module, committed):
            commits.append([r.case_id for r in committed])

    def fit(batches):
        editor = _rome(tokenizer)
        loader = torch.utils.data.DataLoader(batches, batch_size=1, collate_fn=list)
        _trainer([Count()]).fit(editor, train_dataloaders=loader)
        return editor

    once = fit(requests)
    commits.clear()
    twice = fit([requests[0], requests[0], requests[1]])
    assert commits == [[0], [1]]
    name = once.touched[0]
    assert torch.equal(dict(once.model.named_parameters())[name], dict(twice.model.named_parameters())[name])
    state: dict = {"state_dict": {}}
    twice.on_save_checkpoint(state)
    assert state["lit_edit_done"] == [0, 1]
    fresh = _rome(tokenizer)
    fresh.on_load_checkpoint(state)
    assert fresh._done == {0, 1}
    fresh.restore()
    assert fresh._done == set()


def test_checkpoint_of_a_single_edit_run_holds_the_restored_weights(tokenizer, tmp_path, cache):
    """accumulate=False: a checkpoint saved at the end of a batch (before the editor undoes it)
    holds the base weights, so a resumed run edits from them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    editor = _rome(tokenizer, accumulate=False)
    base = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    save = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True, save_top_k=0)
    _trainer([save], enable_checkpointing=True).fit(editor, datamodule=EditDataModule(requests=_requests(2), batch_size=1,
                                                                                       shuffle=False))
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert state["state_dict"] and all(torch.equal(v, base[k[len("model."):]]) for k, v in state["state_dict"].items())


def test_bad_options_and_foreign_files_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="every must be >= 1"):
        RetentionCurve(every=0)
    with pytest.raises(TypeError, match="first_chunk must be true or false"):
        RetentionCurve(first_chunk="yes")
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        RetentionCurve(protocols=["probabilty"])
    with pytest.raises(ValueError, match="is a directory"):
        RetentionCurve(path=tmp_path)
    with pytest.raises(ValueError, match="locality_limit must be >= 1"):
        RetentionCurve(locality_limit=0)
    with pytest.raises(ValueError, match="applied_limit must be >= 1"):
        RetentionCurve(applied_limit=0)
    foreign = tmp_path / "notes.csv"
    foreign.write_text("my,own\n1,2\n")
    editor = _rome(tokenizer)
    with pytest.raises(FileExistsError, match="is not a retention curve"):
        _trainer([RetentionCurve(path=foreign, plot=False)]).fit(editor, datamodule=EditDataModule(requests=_requests(1), batch_size=1))
    assert foreign.read_text() == "my,own\n1,2\n" and not editor.touched  # refused before any edit
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(",".join(LEADING_COLUMNS) + "\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _trainer([RetentionCurve(path=earlier, plot=False)]).fit(editor, datamodule=EditDataModule(requests=_requests(1), batch_size=1))


def test_depth_first_resume_counts_the_batch_its_checkpoint_was_saved_in(tokenizer, tmp_path):
    """DepthFirstFT announces a batch at the end of its training step, before ModelCheckpoint
    saves at the end of the batch: a fit that stops after that save holds the batch in both the
    editor's record and the curve, and the resumed curve's rows equal an uninterrupted run's."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_edit.editors import DepthFirstFT

    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("stopped")

    def run(stop=False, ckpt=None, directory=None, name="df.csv"):
        L.seed_everything(0)
        editor = DepthFirstFT(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, target_modules=["mlp.down_proj"],
                              layers_to_transform=[1], lr=1e-2, steps=3)
        curve = RetentionCurve(every=2, protocols=["probability", "token_accuracy"], plot=False, path=tmp_path / name,
                               overwrite=True)
        callbacks = [curve, *([Stop()] if stop else [])]
        if directory is not None:
            callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_last=True, save_top_k=0))
        trainer = _trainer(callbacks, enable_checkpointing=directory is not None)
        data = EditDataModule(requests=_requests(5), batch_size=1, shuffle=False)
        if stop:
            with pytest.raises(RuntimeError, match="stopped"):
                trainer.fit(editor, datamodule=data)
        else:
            trainer.fit(editor, datamodule=data, ckpt_path=ckpt)
        return curve

    full = [dict(r) for r in run().rows]
    run(stop=True, directory=tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    kept = next(v for k, v in state["callbacks"].items() if k.startswith("RetentionCurve"))
    assert len(state["lit_edit_done"]) == 3 and len(kept["applied"]) == 3  # the 3rd batch announced before the save
    with pytest.raises(ValueError, match="holds no retention curve for this callback"):  # another path: another curve
        run(ckpt=str(tmp_path / "ck" / "last.ckpt"), name="other.csv")
    resumed = run(ckpt=str(tmp_path / "ck" / "last.ckpt"))
    assert [r["edits_applied"] for r in resumed.rows] == [r["edits_applied"] for r in full] == [0, 2, 4, 5]
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed.rows] == [
        {k: v for k, v in r.items() if k not in strip} for r in full]


def test_depth_first_without_accumulate_checkpoints_the_restored_weights(tokenizer, tmp_path):
    """single / batched DepthFirstFT undoes each batch's edit at the end of the batch, after a
    ModelCheckpoint saved there: the checkpoint holds the weights as they are after the batch
    (the originals), not the edit about to be undone."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_edit.editors import DepthFirstFT

    L.seed_everything(0)
    editor = DepthFirstFT(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, target_modules=["mlp.down_proj"],
                          layers_to_transform=[1], lr=1e-2, steps=3, accumulate=False)
    name = "model.layers.1.mlp.down_proj.weight"  # in editor.model; "model." + name in the checkpoint
    original = dict(editor.model.named_parameters())[name].detach().clone()
    seen = []

    class Watch(L.Callback):  # the tensor is edited when the checkpoint is taken
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(not torch.equal(dict(module.model.named_parameters())[name], original))

    check = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = _trainer([Watch(), check], enable_checkpointing=True)
    trainer.fit(editor, datamodule=EditDataModule(requests=_requests(2), batch_size=1, shuffle=False))
    assert seen == [True, True]
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(state[f"model.{name}"], original)


def test_resumed_closed_form_fit_computes_statistics_and_templates_on_the_base_model(tokenizer, cache):
    """A MEMIT fit resumed from a checkpoint (its edits already in the weights) uses the key
    statistics and context templates of the base model, as the uninterrupted fit did."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_edit.editors import MEMIT

    def make():
        torch.manual_seed(0)
        return MEMIT(model=make_tiny_llama(len(tokenizer), layers=3), tokenizer=tokenizer, layers=[0, 1], values={"steps": 2},
                     statistics={"n_samples": 30, "max_length": 32, "batch_size": 16, "corpus": write_corpus(cache),
                                 "update_weight": 1.0}, templates={"max_per_group": 1})

    first = make()
    checkpoint = ModelCheckpoint(dirpath=cache / "ck", every_n_train_steps=1, save_last=True, save_top_k=0)
    _trainer([checkpoint], enable_checkpointing=True).fit(first, datamodule=EditDataModule(requests=_requests(2), batch_size=1,
                                                                                         shuffle=False))
    assert first.trainer.global_step == 2  # each edit batch counts as a step
    state = torch.load(cache / "ck" / "last.ckpt", weights_only=False)
    assert set(state["state_dict"]) == {f"model.{n}" for n in first.touched}  # only the edited tensors
    import shutil

    shutil.rmtree(cache / "stats", ignore_errors=True)  # computed again, on the resumed editor's model
    shutil.rmtree(cache / "templates", ignore_errors=True)
    resumed = make()
    data = EditDataModule(requests=_requests(3), batch_size=1, shuffle=False)
    _trainer([], max_epochs=1).fit(resumed, datamodule=data, ckpt_path=str(cache / "ck" / "last.ckpt"))
    for layer in (0, 1):
        assert torch.equal(resumed._stats[layer], first._stats[layer])
    assert resumed.context_templates() == first.context_templates()


def _run_worker(spec: dict, tmp_path: Path, name: str, hold: bool = False):
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, str(TESTS / "retention_worker.py"), str(spec_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=TESTS,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "LIT_EDIT_HOME": str(tmp_path / "home")})


def test_killed_run_resumes_curve_without_losing_or_repeating_a_row(tokenizer, tmp_path):
    """A sequential ROME run (checkpoint after every batch, last.ckpt) is SIGKILLed from outside
    once its CSV holds 2 rows, at a moment when the second row is written but its batch's
    checkpoint is not; rerun with ckpt_path="last", its final CSV has the rows of an
    uninterrupted run: the same edits_applied column and the same figures, exactly (tolerance
    0), and the same edited weights bit for bit."""
    from safetensors.torch import load_file

    base = {"tokenizer": str(Path(tokenizer.name_or_path)), "requests": [r.to_dict() for r in _requests(6)],
            "every": 2, "ppl_texts": PPL_TEXTS}
    full = _run_worker({**base, "csv": str(tmp_path / "full.csv"), "ckpt_dir": str(tmp_path / "ck_full"),
                        "out": str(tmp_path / "full.safetensors")}, tmp_path, "full")  # runs beside the killed one

    killed_csv = tmp_path / "killed.csv"
    spec = {**base, "csv": str(killed_csv), "ckpt_dir": str(tmp_path / "ck"), "out": str(tmp_path / "resumed.safetensors")}
    child = _run_worker({**spec, "hold": True}, tmp_path, "killed")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if killed_csv.exists() and len(_read(killed_csv)) >= 2:
                break
            time.sleep(0.05)
        rows_at_kill = _read(killed_csv) if killed_csv.exists() else []
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        out = child.communicate()[0]
        if sys.exc_info()[0] is not None:  # the test fails here: do not leave the uninterrupted run behind
            full.kill()
            full.communicate()
    log_full = full.communicate(timeout=120)[0]
    assert full.returncode == 0, log_full[-3000:]
    assert child.returncode == -signal.SIGKILL, out[-3000:]
    assert [r["edits_applied"] for r in rows_at_kill] == ["0", "2"], out[-3000:]
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    kept = next(v for k, v in state["callbacks"].items() if k.startswith("RetentionCurve"))
    assert [r["edits_applied"] for r in kept["rows"]] == [0]  # the row at 2 came after the last checkpoint
    assert state["lit_edit_done"] == [0]

    resumed = _run_worker({**spec, "ckpt_path": "last"}, tmp_path, "resumed")
    log_resumed = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, log_resumed[-3000:]

    got, want = _read(killed_csv), _read(tmp_path / "full.csv")
    assert [r["edits_applied"] for r in got] == [r["edits_applied"] for r in want] == ["0", "2", "4", "6"]
    assert list(got[0]) == list(want[0])
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "seconds"} == {k: v for k, v in w.items() if k != "seconds"}
    a, b = load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "full.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_round_locft_bf_commits_before_the_curve_ends(tokenizer, tmp_path):
    """A LocFT-BF fit without rounds that runs to its epoch budget commits its edits at the end
    of its last epoch, while the curve still listens: the curve gets its row at 4 edits, with
    the edited model's figures."""
    from lit_edit.editors import LocFTBF

    requests = _requests(4)
    editor = LocFTBF(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, target_modules=["mlp.down_proj"],
                     layers_to_transform=[1], lr=1e-2, min_loss=0.0)
    curve = RetentionCurve(every=2, protocols=["probability"], path=tmp_path / "curve.csv", ppl_texts=1,
                           ppl_corpus=PPL_TEXTS, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[curve])
    trainer.fit(editor, datamodule=EditDataModule(requests=requests, batch_size=2, shuffle=False))
    rows = _read(tmp_path / "curve.csv")
    assert [int(r["edits_applied"]) for r in rows] == [0, 4]
    assert float(rows[1]["update_norm_total"]) > 0 and rows[1]["editor"] == "LocFTBF"
    assert editor.round_history[-1]["stopped"] == "end of fit" and editor.round_history[-1]["epochs"] == 3
