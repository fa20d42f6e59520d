"""recipes/rome_collapse.py and recipes/batch_size_study.py (over lit_edit.long_runs) on a tiny
model: tables, curves, plots and the names every file carries; a rerun resumes without refitting
finished parts."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
from helpers import FIXTURE_FILES, load_recipe, save_tiny_model, write_corpus

from lit_edit import long_runs

pytestmark = pytest.mark.usefixtures("one_thread")

META = ("editor", "strategy", "batch_size", "timing", "model", "data")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-long"), tokenizer, layers=3)


def _common(tmp_path, tiny_dir, out: str) -> list[str]:
    corpus = write_corpus(tmp_path)
    return [
        f"--model.model={tiny_dir}",
        "--model.values.steps=3",
        "--model.templates.max_per_group=1",
        "--model.statistics.n_samples=30",
        "--model.statistics.max_length=32",
        f"--model.statistics.corpus={corpus}",
        f"--data.path={FIXTURE_FILES['counterfact_flat']}",
        "--data.offset=0",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--curve.ppl_corpus={corpus}",
        "--curve.ppl_texts=2",
        "--curve.ppl_max_length=16",
        "--curve.max_new_tokens=3",
        f"--out_dir={tmp_path / out}",
    ]


def _csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _count_fits(monkeypatch) -> list[int]:
    fits: list[int] = []
    original = L.Trainer.fit
    monkeypatch.setattr(L.Trainer, "fit", lambda self, *a, **kw: (fits.append(1), original(self, *a, **kw))[1])
    return fits


def test_rome_collapse_table_plot_and_resume(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))
    recipe = load_recipe("rome_collapse")
    fits = _count_fits(monkeypatch)
    args = [*_common(tmp_path, tiny_dir, "collapse"), "--data.limit=3", "--curve.every=2", "--model.layers=[1]"]

    first = recipe.main([*args, "--variants=[original]"])
    assert len(fits) == 1
    out = tmp_path / "collapse"
    # rows at 2 and at the last edit (3); every row names the run
    assert [(r["variant"], r["edits_applied"]) for r in first] == [("original", 2), ("original", 3)]
    for r in first:
        assert r["editor"] == "ROME" and r["strategy"] == "sequential" and str(r["batch_size"]) == "1"
        assert r["timing"] == "retention" and r["model"] and r["data"] == f"{FIXTURE_FILES['counterfact_flat']}[0:3]"
        assert 0.0 <= r["prob/ES"] <= 100.0 and 0.0 <= r["gen_em/reliability"] <= 1.0 and r["ppl"] > 0
        assert r["update_norm_total"] > 0 and r["edit/denominator_min"] != 0
    curve = _csv(out / "original" / "retention.csv")
    assert [int(r["edits_applied"]) for r in curve] == [0, 2, 3]
    assert float(curve[2]["prob/ES"]) == first[1]["prob/ES"]  # the table is the curve's rows, not a new evaluation
    edits = _csv(out / "original" / "edits.csv")
    assert [int(r["edits_applied"]) for r in edits] == [1, 2, 3]
    assert all(r["strategy"] == "sequential" and float(r["edit/update_norm"]) > 0 and float(r["edit_seconds"]) > 0 for r in edits)
    # the cumulative norm of the last row is at most the sum of the per-edit norms (triangle inequality)
    assert first[1]["update_norm_total"] <= sum(float(r["edit/update_norm"]) for r in edits) + 1e-9

    # adding the other variant fits it alone; the first is read back, not refitted
    rows = recipe.main(args)
    assert len(fits) == 2
    assert [(r["variant"], r["edits_applied"]) for r in rows] == [("original", 2), ("original", 3), ("r-rome", 2), ("r-rome", 3)]
    assert [(r["prob/ES"], r["update_norm_total"]) for r in rows[:2]] == [(r["prob/ES"], r["update_norm_total"]) for r in first]
    table = _csv(out / "collapse.csv")
    assert [(r["variant"], r["original_rome"]) for r in table] == [("original", "True")] * 2 + [("r-rome", "False")] * 2
    assert all(all(r[k] for k in META) for r in table)
    document = json.loads((out / "collapse.json").read_text())
    assert document["strategy"] == "sequential" and document["timing"] == "retention" and len(document["rows"]) == 4
    md = (out / "collapse.md").read_text()
    assert "ROME collapse: sequential edits (batch 1)" in md and "retention evaluation every 2 edits" in md
    assert (out / "collapse.png").stat().st_size > 0
    variants = _csv(out / "variants.csv")
    assert [v["variant"] for v in variants] == ["original", "r-rome"]

    # a third run fits nothing and leaves the curves untouched
    curves = {v: (out / v / "retention.csv").read_bytes() for v in ("original", "r-rome")}
    again = recipe.main(args)
    assert len(fits) == 2 and len(again) == 4
    assert {v: (out / v / "retention.csv").read_bytes() for v in curves} == curves
    assert "Wrote" in capsys.readouterr().out


def test_rome_collapse_resumes_an_interrupted_variant(tmp_path, tiny_dir, monkeypatch):
    """A variant whose fit stopped after its first edit (checkpoint saved) continues from there:
    its curve ends with the same rows as an uninterrupted run's, edit by edit."""
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))
    recipe = load_recipe("rome_collapse")
    args = [*_common(tmp_path, tiny_dir, "full"), "--data.limit=3", "--curve.every=1", "--model.layers=[1]", "--variants=[r-rome]"]
    recipe.main(args)
    full = _csv(tmp_path / "full" / "r-rome" / "retention.csv")

    stopped = [a.replace("full", "cut") for a in args]

    class Stop(Exception):
        pass

    original = long_runs.EditLog.on_edits_committed

    def stop_after_first(self, trainer, editor, requests):
        original(self, trainer, editor, requests)
        if len(self.rows) == 2:  # the second edit is logged; its checkpoint is never written
            raise Stop

    monkeypatch.setattr(long_runs.EditLog, "on_edits_committed", stop_after_first)
    with pytest.raises(Stop):
        recipe.main(stopped)
    assert (tmp_path / "cut" / "r-rome" / "ckpt" / "last.ckpt").exists()
    assert not (tmp_path / "cut" / "variants.csv").exists()
    monkeypatch.setattr(long_runs.EditLog, "on_edits_committed", original)
    recipe.main(stopped)
    cut = _csv(tmp_path / "cut" / "r-rome" / "retention.csv")
    assert [r["edits_applied"] for r in cut] == [r["edits_applied"] for r in full] == ["0", "1", "2", "3"]
    for a, b in zip(cut, full):
        assert a["prob/ES"] == b["prob/ES"] and a["update_norm_total"] == b["update_norm_total"]
    assert [r["edits_applied"] for r in _csv(tmp_path / "cut" / "r-rome" / "edits.csv")] == ["1", "2", "3"]


def test_rome_collapse_refuses_bad_options(tmp_path, tiny_dir, capsys):
    recipe = load_recipe("rome_collapse")
    base = [*_common(tmp_path, tiny_dir, "bad"), "--data.limit=2"]
    for bad, said in ((["--variants=[rome]"], "--variants"), (["--data.batch_size=2"], "--data.batch_size"),
                      (["--model.accumulate=false"], "accumulate"), (["--model.original_rome=true"], "--variants"),
                      (["--curve.every=0"], "every")):
        with pytest.raises(SystemExit):
            recipe.main([*base, *bad])
        assert said in capsys.readouterr().err
    assert not (tmp_path / "bad" / "variants.csv").exists()


def test_batch_size_study_table_plots_and_resume(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))
    recipe = load_recipe("batch_size_study")
    fits = _count_fits(monkeypatch)
    args = [*_common(tmp_path, tiny_dir, "batch"), "--data.limit=2", "--curve.every=1", "--model.layers=[1]",
            "--model.statistics.update_weight=1.0", "--eval.max_new_tokens=3", "--eval.ppl_texts=2",
            f"--eval.ppl_corpus={write_corpus(tmp_path)}", "--locft_epochs=2", "--locft_minibatch=1"]

    first = recipe.main([*args, "--editors=[rome,memit]", "--batch_sizes=[1]"])
    assert len(fits) == 2 and [(r["editor"], r["batch_size"]) for r in first] == [("ROME", 1), ("MEMIT", 1)]
    rows = recipe.main([*args, "--editors=[rome,memit,locft_bf]", "--batch_sizes=[1,0]"])  # resumes: only new cells
    if not recipe.rounds_supported():  # a LocFTBF without round_size: skipped, and said so
        assert "LocFT-BF skipped" in capsys.readouterr().out and len(fits) == 3 and len(rows) == 3
        return
    assert len(fits) == 5
    assert [(r["editor"], str(r["batch_size"]), r["strategy"]) for r in rows] == [
        ("ROME", "1", "sequential"), ("MEMIT", "1", "sequential"), ("MEMIT", "2", "sequential_batched"),
        ("LocFTBF", "1", "sequential"), ("LocFTBF", "2", "sequential_batched")]
    out = tmp_path / "batch"
    table = _csv(out / "batch_sizes.csv")
    assert len(table) == 5
    for r in table:
        assert all(r[k] for k in META) and r["timing"] == "after-all" and r["n_edits"] == "2"
        assert r["data"] == f"{FIXTURE_FILES['counterfact_flat']}[0:2]"
        for figure in ("ES", "PS", "NS", "S", "gen_EM", "ppl", "edit_seconds"):
            assert math.isfinite(float(r[figure])), figure
        assert float(r["ES"]) == float(r["prob/ES"]) and float(r["edit_seconds"]) > 0
        from lit_edit.evaluation.metrics import harmonic_mean

        assert float(r["S"]) == pytest.approx(harmonic_mean([float(r[k]) for k in ("ES", "PS", "NS")]))
    # a retention curve per cell, rows at every edit, naming the cell
    curve = _csv(out / "memit_b2" / "retention.csv")
    assert [c["edits_applied"] for c in curve] == ["0", "2"]
    assert curve[1]["strategy"] == "sequential_batched" and curve[1]["batch_size"] == "2" and curve[1]["timing"] == "retention"
    locft = _csv(out / "locft_bf_b1" / "retention.csv")
    assert [c["edits_applied"] for c in locft] == ["0", "1", "2"] and locft[1]["editor"] == "LocFTBF"
    assert [e["requests"] for e in _csv(out / "locft_bf_b1" / "edits.csv")] == ["1", "1"]
    md = (out / "batch_sizes.md").read_text()
    assert "| (unedited) |" in md and "after-all evaluation" in md and "sequential_batched" in md
    document = json.loads((out / "batch_sizes.json").read_text())
    assert document["timing"] == "after-all" and len(document["rows"]) == 5
    for png in ("batch_sizes.png", "retention_MEMIT.png", "retention_LocFTBF.png", "retention_ROME.png"):
        assert (out / png).stat().st_size > 0, png

    # a rerun fits nothing, the table is unchanged
    before = (out / "batch_sizes.csv").read_bytes()
    recipe.main([*args, "--editors=[rome,memit,locft_bf]", "--batch_sizes=[1,0]"])
    assert len(fits) == 5 and (out / "batch_sizes.csv").read_bytes() == before
    assert "Wrote" in capsys.readouterr().out


def test_batch_size_study_emmet_alphaedit_and_bad_options(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))
    recipe = load_recipe("batch_size_study")
    assert recipe.cells(["rome", "memit"], [1, 4, 0], 8) == [("rome", 1), ("memit", 1), ("memit", 4), ("memit", 8)]
    with pytest.raises(ValueError, match="exceed"):
        recipe.cells(["memit"], [16], 8)
    base = [*_common(tmp_path, tiny_dir, "bs"), "--data.limit=2", "--curve.every=2", "--model.layers=[1]",
            "--eval.protocols=[probability]"]
    rows = recipe.main([*base, "--editors=[emmet,alphaedit]", "--batch_sizes=[2]"])
    assert [(r["editor"], r["batch_size"]) for r in rows] == [("EMMET", 2), ("AlphaEdit", 2)]
    assert all(math.isfinite(r["ES"]) and math.isfinite(r["NS"]) for r in rows)
    for bad, said in ((["--editors=[ft]"], "--editors"), (["--batch_sizes=[-1]"], "--batch_sizes"),
                      (["--batch_sizes=[4]"], "exceed"), (["--editor_args={memitt: {}}"], "--editor_args"),
                      (["--model.accumulate=false"], "accumulate"), (["--curve.every=0"], "every")):
        with pytest.raises(SystemExit):
            recipe.main([*base, "--out_dir", str(tmp_path / "bad"), *bad])
        assert said in capsys.readouterr().err
    assert not (tmp_path / "bad" / "batch_sizes.csv").exists()


def test_weight_checksum_sees_a_one_bit_change():
    import torch

    layer = torch.nn.Linear(4, 3)
    before = long_runs.snapshot(layer)

    class Holder:
        model = layer

    long_runs.check_restored(Holder, before)  # unchanged: passes
    original = layer.weight[1, 2].clone()
    with torch.no_grad():
        layer.weight[1, 2] = torch.nextafter(original, torch.tensor(10.0))  # the next float: one bit
    with pytest.raises(RuntimeError, match="weight"):
        long_runs.check_restored(Holder, before)
    with torch.no_grad():
        layer.weight[1, 2] = original
    long_runs.check_restored(Holder, before)
