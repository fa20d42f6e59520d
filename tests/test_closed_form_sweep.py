"""recipes/closed_form_sweep.py on a tiny model: the table by layer, its labels, and resuming."""

from __future__ import annotations

import csv

import pytest
from helpers import FIXTURE_FILES, load_recipe, save_tiny_model, write_corpus


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-sweep"), tokenizer, layers=3)


def _args(tmp_path, tiny_dir, *extra: str) -> list[str]:
    return [
        f"--model.model={tiny_dir}",
        "--model.values.steps=3",
        "--model.templates.max_per_group=1",
        "--model.statistics.n_samples=30",
        "--model.statistics.max_length=32",
        f"--model.statistics.corpus={write_corpus(tmp_path)}",
        f"--data.path={FIXTURE_FILES['counterfact_flat']}",
        "--data.offset=0",
        "--data.limit=2",
        "--eval.max_new_tokens=4",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--out_dir={tmp_path / 'sweep'}",
        *extra,
    ]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rome_sweep_table_and_resume(tmp_path, tiny_dir, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))
    recipe = load_recipe("closed_form_sweep")
    fits = []
    original_fit = recipe.L.Trainer.fit
    monkeypatch.setattr(recipe.L.Trainer, "fit", lambda self, *a, **kw: (fits.append(1), original_fit(self, *a, **kw))[1])

    first = recipe.main(_args(tmp_path, tiny_dir, "--layers=[0]"))
    assert len(fits) == 1 and [r["layer"] for r in first] == [0]
    rows = recipe.main(_args(tmp_path, tiny_dir, "--layers=[0,2]"))  # resumes: only block 2 is new
    assert len(fits) == 2
    assert [int(r["layer"]) for r in rows] == [0, 2]
    table = _csv(tmp_path / "sweep" / "layers.csv")
    assert [int(r["layer"]) for r in table] == [0, 2]
    for r, layer in zip(table, (0, 2)):
        assert r["editor"] == "rome" and r["strategy"] == "single" and r["batch_size"] == "1" and r["timing"] == "immediate"
        assert r["model"] and r["data"] == f"{FIXTURE_FILES['counterfact_flat']}[0:2]" and r["n_requests"] == "2"
        assert r["edit_layers"] == str(layer) and r["window"] == "1"
        for figure in ("prob/ES", "prob/PS", "prob/NS", "gen_em/reliability", "gen_em/locality_agreement"):
            assert 0.0 <= float(r[figure]) <= (100.0 if figure.startswith("prob/") else 1.0)
    from lit_edit.evaluation.metrics import harmonic_mean

    s = harmonic_mean([float(table[0][k]) for k in ("prob/ES", "prob/PS", "prob/NS")])
    assert float(table[0]["prob/S"]) == pytest.approx(s)

    # a third run recomputes nothing: no fit, the same rows, the CSV untouched
    before = (tmp_path / "sweep" / "layers.csv").read_bytes()
    again = recipe.main(_args(tmp_path, tiny_dir, "--layers=[0,2]"))
    assert len(fits) == 2
    assert (tmp_path / "sweep" / "layers.csv").read_bytes() == before
    assert [{k: str(v) for k, v in r.items()} for r in again] == [{k: str(v) for k, v in r.items()} for r in table]

    md = (tmp_path / "sweep" / "layers.md").read_text()
    assert "ROME by layer" in md and "single edits (batch 1)" in md and "immediate evaluation" in md and "| (unedited) |" in md
    assert (tmp_path / "sweep" / "layers.png").stat().st_size > 0
    assert "Wrote" in capsys.readouterr().out


def test_memit_window_batched(tmp_path, tiny_dir, monkeypatch, one_thread):
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))
    recipe = load_recipe("closed_form_sweep")
    rows = recipe.main(_args(tmp_path, tiny_dir, "--editor=memit", "--window=2", "--layers=[2]", "--data.batch_size=0",
                             "--model.statistics.update_weight=1.0"))
    (row,) = rows
    assert row["strategy"] == "batched" and row["batch_size"] == 2 and row["edit_layers"] == "1-2" and row["anchor"] == "center"
    assert "prob/S" in row


def test_window_layers_and_bad_options(tmp_path, tiny_dir, capsys):
    recipe = load_recipe("closed_form_sweep")
    assert recipe.window_layers(4, 3, "center", 30) == [3, 4, 5]
    assert recipe.window_layers(4, 3, "start", 30) == [4, 5, 6]
    assert recipe.window_layers(0, 3, "center", 30) == [0, 1, 2]
    assert recipe.window_layers(29, 3, "start", 30) == [27, 28, 29]
    assert recipe.window_layers(4, 1, "center", 30) == [4]
    for bad, said in ((["--window=3"], "--window 3"), (["--editor=emmet"], "--editor"), (["--model.accumulate=true"], "accumulate"),
                      (["--editor=memit", "--anchor=middle"], "--anchor")):
        with pytest.raises(SystemExit):
            recipe.main(_args(tmp_path, tiny_dir, *bad))
        assert said in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "layers.csv").exists()  # refused before any run
