"""Recipes and the ``lit-edit`` CLI, end to end on a tiny model saved to disk."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, load_recipe, save_tiny_model

RECIPES = ROOT / "recipes"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def common_args(tmp_path: Path, tiny_dir: Path) -> list[str]:
    return [
        f"--model.model={tiny_dir}",
        "--model.target_modules=[mlp.down_proj]",
        "--model.layers_to_transform=[0]",  # below the last block: the recipe writes the edit at the subject's tokens
        "--model.lr=1e-2",
        "--data.limit=3",
        "--trainer.max_epochs=3",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--save_dir={tmp_path / 'edit'}",
    ]


def test_locft_bf_recipe_runs_end_to_end(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "cache"))  # the preservation statistics of this model
    recipe = load_recipe("locft_bf")
    args = common_args(tmp_path, tiny_dir) + [
        "--model.preservation_texts=4",  # the YAML's preservation term, on 4 Wikipedia texts
        "--trainer.callbacks=[{class_path: lit_edit.evaluation.EditEvaluation, "
        "init_args: {protocols: [probability, token_accuracy, generation, perplexity], ppl_texts: 3, max_new_tokens: 4}}]",
    ]
    cli = recipe.main(args)
    assert isinstance(cli.model.hparams["lr"], float) and cli.model.hparams["lr"] == 1e-2  # YAML/CLI floats stay floats
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert list(meta["tensors"]) == ["model.layers.0.mlp.down_proj.weight"]
    assert meta["editor"] == "lit_edit.editors.finetune.LocFTBF"
    summaries = list((tmp_path / "logs").rglob("summary.json"))
    assert summaries, "no summary.json written"
    summary = json.loads(summaries[0].read_text())
    assert "gen_em/reliability" in json.dumps(summary) and "ppl/wiki" in json.dumps(summary)
    metrics_csv = list((tmp_path / "logs").rglob("metrics.csv"))
    assert metrics_csv and "train/loss" in metrics_csv[0].read_text()
    assert cli.model.hparams["preservation"] == 30.0 and cli.model.hparams["write_positions"] == "subject"
    assert "train/preservation" in metrics_csv[0].read_text()
    assert list((tmp_path / "cache" / "stats").glob("*.pt")), "preservation statistics not cached"
    out = capsys.readouterr().out
    assert "before" in out and "after" in out  # the results table


def test_console_script_reaches_the_same_editor(tmp_path, tiny_dir):
    from lit_edit.cli import main

    main(["fit", "--model", "LocFTBF", *common_args(tmp_path, tiny_dir), "--trainer.callbacks=[]"])
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert meta["editor"] == "lit_edit.editors.finetune.LocFTBF"
    assert meta["init_args"]["lr"] == 1e-2


def test_recipe_run_records_its_full_config(tmp_path, tiny_dir, capsys):
    recipe = load_recipe("locft_bf")
    callback = "lit_edit.evaluation.EditEvaluation"
    args = common_args(tmp_path, tiny_dir) + [
        "--data.path=demo",
        "--model.preservation=0",
        f"--trainer.callbacks=[{{class_path: {callback}, init_args: {{protocols: [token_accuracy], print_table: false}}}}]",
    ]
    recipe.main(args)
    in_logs = list((tmp_path / "logs").rglob("config.yaml"))
    assert len(in_logs) == 1, "no config.yaml in the log dir"
    assert list(in_logs[0].parent.glob("summary.json")), "config.yaml is not beside summary.json"
    in_edit = tmp_path / "edit" / "config.yaml"
    assert in_edit.is_file(), "no config.yaml in the save dir"
    for path in (in_logs[0], in_edit):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["data"]["path"] == "demo" and cfg["data"]["limit"] == 3
        assert cfg["trainer"]["max_epochs"] == 3
        assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == [callback]
        assert cfg["model"]["model"] == str(tiny_dir) and cfg["model"]["lr"] == 1e-2
        assert cfg["save_dir"] == str(tmp_path / "edit")
    assert yaml.safe_load(in_edit.read_text()) == yaml.safe_load(in_logs[0].read_text())

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the saved file is a valid --config for the same recipe
        recipe.main(["--config", str(in_edit), "--print_config"])
    assert e.value.code in (0, None)
    reparsed = yaml.safe_load(capsys.readouterr().out)
    for key in ("model", "data", "trainer", "save_dir"):
        assert reparsed[key] == yaml.safe_load(in_edit.read_text())[key], key


def test_config_typo_is_a_clear_error(tmp_path, tiny_dir, capsys):
    recipe = load_recipe("locft_bf")
    with pytest.raises(SystemExit):
        recipe.main(common_args(tmp_path, tiny_dir) + ["--model.lrr=1e-3"])
    assert "lrr" in capsys.readouterr().err
    assert not (tmp_path / "edit").exists()


@pytest.mark.parametrize("yaml_path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_parses_against_its_recipe(yaml_path, capsys):
    text = yaml_path.read_text()
    assert text.startswith(f"# python recipes/{yaml_path.stem}.py"), "configs start with the command that runs them"
    recipe = load_recipe(yaml_path.stem)
    with pytest.raises(SystemExit) as e:
        recipe.main(["--config", str(yaml_path), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] == "smollm2-135m"
    for key, value in (yaml.safe_load(text).get("model") or {}).items():
        if isinstance(value, dict):  # a group (values.*, statistics.*) may set only some of its fields
            for field, v in value.items():
                assert printed["model"][key][field] == v, f"{key}.{field}"
        else:
            assert printed["model"][key] == value, key


def test_study_recipes_run_and_resume(tmp_path, tiny_dir, capsys):
    locate = load_recipe("location_sweep")
    args = [
        f"--model.model={tiny_dir}",
        "--model.lr=1e-2",
        "--data.path=demo",
        "--data.limit=3",
        "--data.offset=0",  # the YAML samples CounterFact records 1000+
        "--eval.protocols=[generation,token_accuracy,perplexity]",
        "--eval.ppl_texts=2",
        "--eval.max_new_tokens=3",
        "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--layers=[0,1]",
        "--modules=[mlp_down,attn_out]",
        f"--out_dir={tmp_path / 'locate'}",
    ]
    rows = locate.main(args)
    printed = capsys.readouterr().out
    assert all(0.0 <= float(r["tok_acc/locality"]) <= 1.0 for r in rows)  # the score's locality
    assert "tok_acc/locality" in printed.split("Wrote")[0]  # a column of the printed table
    assert "Recommended location" in printed or "locality = tok_acc/locality" in printed
    assert {(r["module"], int(r["layer"])) for r in rows} == {(m, l) for m in ("mlp_down", "attn_out") for l in (0, 1)}
    assert (tmp_path / "locate" / "locations.png").stat().st_size > 0
    csv_before = (tmp_path / "locate" / "locations.csv").read_text()
    record = yaml.safe_load((tmp_path / "locate" / "config.yaml").read_text())  # the run's resolved settings
    assert record["data"]["limit"] == 3 and record["trainer"]["max_epochs"] == 2 and record["layers"] == [0, 1]
    assert record["model"]["lr"] == 1e-2 and record["eval"]["ppl_texts"] == 2
    table_before = printed.split("Wrote")[0]

    from lit_edit.evaluation import Evaluator

    def no_evaluation(*a, **k):
        raise AssertionError("a finished sweep evaluated the model again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evaluator, "evaluate", no_evaluation)
        rows_again = locate.main(args)  # resumes: nothing left to run, nothing repeated or re-measured
        assert len(rows_again) == 4
        assert (tmp_path / "locate" / "locations.csv").read_text().count("\n") == csv_before.count("\n")
        assert capsys.readouterr().out.split("Wrote")[0] == table_before  # same table and recommendation
        with pytest.raises(AssertionError, match="evaluated the model again"):  # other settings: measured again
            locate.main([a for a in args if not a.startswith("--eval.max_new_tokens")] + ["--eval.max_new_tokens=4"])

    study = load_recipe("bf_vs_df")
    rows = study.main(
        [a for a in args if not a.startswith(("--layers", "--modules", "--out_dir"))]
        + ["--n_edits=[2]", "--df_steps=2", f"--out_dir={tmp_path / 'study'}"]
        + ["--model.layers_to_transform=[1]"]  # the YAML pins SmolLM2's block 4
    )
    assert {r["method"] for r in rows} == {"bf_minibatch", "bf_sample", "df", "unedited"}
    assert (tmp_path / "study" / "bf_vs_df.png").exists()
    df = next(r for r in rows if r["method"] == "df")
    assert 0 < float(df["optimizer_steps"]) <= 2 * 2  # N = 2 requests, at most --df_steps each
    unedited = next(r for r in rows if r["method"] == "unedited")
    assert float(unedited["locality"]) == 1.0  # the reference agrees with itself


def test_edit_score_matches_hand_computed_values():
    from lit_edit.study import edit_score

    row = {"reliability": "1.0", "generalization": "0.5", "locality": "0.0", "tok_acc/locality": "0.25", "perplexity": "10.5"}
    assert edit_score(row, ppl_before=10.0, locality_key="tok_acc/locality") == pytest.approx(3 / (1 + 2 + 4))
    assert edit_score(row, ppl_before=10.0) == 0.0  # generation agreement 0: nothing to rank
    assert edit_score(row, ppl_before=9.0, locality_key="tok_acc/locality") == 0.0  # perplexity +17% > 10%
    assert math.isnan(edit_score({**row, "tok_acc/locality": ""}, 10.0, locality_key="tok_acc/locality"))  # older row


def test_study_column_follows_the_study_row_mapping():
    from lit_edit.study import study_column, study_row

    both = {"gen_em/locality_agreement": 0.1, "tok_acc/locality": 0.4, "ppl/wiki": 17.0}
    assert study_column(both, "gen_em/locality_agreement") == "locality"
    assert study_column(both, "tok_acc/locality") == "tok_acc/locality"
    assert study_column({"tok_acc/locality": 0.4}, "tok_acc/locality") == "locality"  # no generation: the headline one
    row = study_row(both)
    assert row[study_column(both, "tok_acc/locality")] == 0.4 and row[study_column(both, "gen_em/locality_agreement")] == 0.1


def test_location_sweep_score_locality_needs_its_protocol(tmp_path, tiny_dir, capsys):
    locate = load_recipe("location_sweep")
    with pytest.raises(SystemExit):
        locate.main([
            f"--model.model={tiny_dir}",
            "--data.path=demo",
            "--data.offset=0",
            "--eval.protocols=[token_accuracy,perplexity]",
            "--score_locality=generation",
            f"--out_dir={tmp_path}",
        ])
    assert "--score_locality generation needs the 'generation' evaluation protocol" in capsys.readouterr().err


# ---------------------------------------------------------------------- output paths, overwrite, resume, seeds


def no_instantiation(monkeypatch):
    """Make any model loading fail loudly: a refusal must come before it (and so before any fitting)."""
    from lit_edit.cli import EditCLI

    def refuse(self):
        raise AssertionError("classes instantiated: the check came too late")

    monkeypatch.setattr(EditCLI, "instantiate_classes", refuse)


def refusal(recipe_args, capsys) -> str:
    recipe = load_recipe("locft_bf")
    with pytest.raises(SystemExit) as e:
        recipe.main(recipe_args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_output_paths_are_checked_before_anything_is_fitted(tmp_path, tiny_dir, capsys, monkeypatch):
    no_instantiation(monkeypatch)
    base = common_args(tmp_path, tiny_dir)  # a later --save_dir wins
    afile = tmp_path / "afile"
    afile.write_text("a file")
    err = refusal(base + [f"--save_dir={afile / 'edit'}"], capsys)  # under a regular file
    assert "--save_dir" in err and str(afile) in err and "regular file" in err
    err = refusal(base + [f"--save_dir={afile}", "--overwrite=true"], capsys)  # a regular file
    assert "--save_dir" in err and "regular file" in err and afile.read_text() == "a file"
    err = refusal(base + ["--save_dir="], capsys)  # empty: an error, not the default
    assert "--save_dir is empty" in err
    err = refusal(base + ["--export_dir="], capsys)
    assert "--export_dir is empty" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite=true"]):  # a directory of other files, even with --overwrite
        err = refusal(base + [f"--save_dir={mine}", *extra], capsys)
        assert "--save_dir" in err and str(mine) in err and "not a lit_edit edit" in err
        err = refusal(base + [f"--save_dir={tmp_path / 'edit'}", f"--export_dir={mine}", *extra], capsys)
        assert "--export_dir" in err and str(mine) in err and "not a lit_edit export" in err
    assert os.listdir(mine) == ["notes.txt"]
    err = refusal(base + [f"--save_dir={tmp_path / 'same'}", f"--export_dir={tmp_path / 'same'}"], capsys)
    assert "--export_dir" in err and "--save_dir" in err
    err = refusal(base + [f"--ckpt_path={tmp_path / 'missing.ckpt'}"], capsys)
    assert "--ckpt_path" in err and "missing.ckpt" in err
    for options in (["--optimizer=SGD"], ["--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"]):
        err = refusal(base + options, capsys)
        assert "configures its own optimizer" in err and "--model.lr" in err
    from lit_edit.cli import main

    with pytest.raises(SystemExit):  # the console script checks the same way
        main(["fit", "--model", "LocFTBF", *base, f"--save_dir={afile / 'edit'}"])
    assert "regular file" in capsys.readouterr().err


def test_rerun_needs_overwrite_and_keeps_the_users_files(tmp_path, tiny_dir, capsys, monkeypatch):
    recipe = load_recipe("locft_bf")
    args = common_args(tmp_path, tiny_dir) + [
        "--trainer.max_epochs=1",
        "--model.preservation=0",
        "--trainer.callbacks=[]",
        f"--export_dir={tmp_path / 'merged'}",
    ]
    recipe.main(args)
    edit, merged = tmp_path / "edit", tmp_path / "merged"
    (edit / "notes.txt").write_text("my notes")
    (merged / "notes.txt").write_text("my notes")
    first = (edit / "edit.json").read_text()
    with monkeypatch.context() as mp:
        no_instantiation(mp)
        err = refusal(args, capsys)
    assert "--save_dir" in err and str(edit) in err and "--overwrite" in err
    assert (edit / "edit.json").read_text() == first
    recipe.main(args + ["--overwrite=true", "--model.lr=2e-2"])
    assert json.loads((edit / "edit.json").read_text())["init_args"]["lr"] == 2e-2
    assert yaml.safe_load((edit / "config.yaml").read_text())["model"]["lr"] == 2e-2
    assert sorted(os.listdir(edit)) == ["config.yaml", "edit.json", "edit.safetensors", "notes.txt"]
    assert (edit / "notes.txt").read_text() == (merged / "notes.txt").read_text() == "my notes"
    assert (merged / "lit_edit_export.json").is_file() and not [p for p in os.listdir(merged) if p.startswith(".")]


def test_seed_everything_sets_the_unset_seeds(tmp_path, tiny_dir):
    from lit_edit.cli import EditCLI
    from lit_edit.editors import ROME, LocFTBF

    def order(*extra):
        args = [a for a in common_args(tmp_path, tiny_dir) if not a.startswith("--data.limit")]
        cli = EditCLI(LocFTBF, run=False, args=[*args, "--data.batch_size=1", *extra])
        dm = cli.datamodule
        dm.setup("fit")
        return dm.hparams.seed, [r.case_id for batch in dm.train_dataloader() for r in batch]

    seed1, order1 = order("--seed_everything=1")
    seed2, order2 = order("--seed_everything=2")
    assert (seed1, seed2) == (1, 2) and order1 != order2 and sorted(order1) == sorted(order2)
    assert order("--seed_everything=1") == (seed1, order1)
    assert order("--seed_everything=2", "--data.seed=1") == (1, order1)  # an explicit data.seed wins

    def template_seed(*extra):
        cli = EditCLI(ROME, run=False, args=[f"--model.model={tiny_dir}", "--model.layers=[1]", "--trainer.accelerator=cpu", *extra])
        return cli.model.settings.templates.seed

    assert template_seed("--seed_everything=3") == 3
    assert template_seed("--seed_everything=3", "--model.templates.seed=4") == 4


RESUME_SCRIPT = r'''
import sys
import time

import lightning as L


class Hold(L.Callback):
    """Stops in the middle of the second epoch (after the first epoch's checkpoint) until killed."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            print("HOLDING", flush=True)
            time.sleep(600)


if __name__ == "__main__":
    from lit_edit.cli import run_recipe
    from lit_edit.editors import LocFTBF

    run_recipe(LocFTBF, sys.argv[1], sys.argv[2:])
'''


def test_killed_recipe_run_resumes_from_ckpt_path(tmp_path, tiny_dir):
    import signal
    import subprocess
    import sys

    import torch

    from lit_edit.edits import read_edit

    def args(name, ckpt_dir, hold=False):
        callbacks = ["{class_path: __main__.Hold}"] if hold else []
        callbacks.append(
            "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
            f"init_args: {{dirpath: '{ckpt_dir}', every_n_epochs: 1, save_last: true, save_top_k: -1}}}}"
        )
        return [a for a in common_args(tmp_path, tiny_dir) if not a.startswith("--save_dir")] + [
            f"--save_dir={tmp_path / name}",
            "--model.preservation=0",
            "--model.min_loss=0",
            "--data.batch_size=2",
            "--trainer.enable_checkpointing=true",
            f"--trainer.callbacks=[{', '.join(callbacks)}]",
        ]

    script = tmp_path / "run_and_hold.py"
    script.write_text(RESUME_SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script), str(RECIPES / "locft_bf.yaml"), *args("killed", tmp_path / "ckpt", hold=True)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    output = []
    try:
        for line in child.stdout:
            output.append(line)
            if line.startswith("HOLDING"):
                break
        assert (tmp_path / "ckpt" / "last.ckpt").is_file(), "".join(output)[-3000:]
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()  # killed before saving an edit

    recipe = load_recipe("locft_bf")
    resumed = recipe.main(args("killed", tmp_path / "ckpt2") + [f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"])
    uninterrupted_run = recipe.main(args("uninterrupted", tmp_path / "ckpt3"))
    # the run completed its epochs (the recipe's budget extension included) like the uninterrupted one
    assert resumed.trainer.current_epoch == uninterrupted_run.trainer.current_epoch >= 3
    _, after_resume = read_edit(tmp_path / "killed")
    _, uninterrupted = read_edit(tmp_path / "uninterrupted")
    assert after_resume.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(after_resume[name], value, rtol=0, atol=0)


def test_make_run_command_parses(capsys):
    """The README's main command (``make run``) passes options the recipe accepts."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "recipes/locft_bf.py" in x)
    args = line.split("recipes/locft_bf.py", 1)[1].replace("$(ARGS)", "").split()
    recipe = load_recipe("locft_bf")
    with pytest.raises(SystemExit) as e:
        recipe.main(args + ["--print_config"])
    assert e.value.code in (0, None)
    assert "overwrite: true" in capsys.readouterr().out


def test_location_sweep_scores_the_share_of_ns_kept(tmp_path, tiny_dir, capsys):
    locate = load_recipe("location_sweep")
    out = tmp_path / "locate"
    rows = locate.main([
        f"--model.model={tiny_dir}",
        "--model.lr=5e-2",
        "--data.path=demo",
        "--data.limit=4",
        "--data.offset=0",
        "--eval.protocols=[probability,token_accuracy,perplexity]",
        "--eval.ppl_texts=2",
        "--trainer.max_epochs=3",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--layers=[0,1]",
        "--modules=[mlp_down]",
        "--score_locality=neighborhood",
        f"--out_dir={out}",
    ])
    printed = capsys.readouterr().out
    table = printed.split("Wrote")[0]
    header = next(line for line in table.splitlines() if line.startswith("| module"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    unedited = next(line for line in table.splitlines() if line.startswith("| (unedited)"))
    ref = dict(zip(columns, (c.strip() for c in unedited.strip("|").split("|"))))
    ns_before, ppl_before = float(ref["prob/NS"]), float(ref["perplexity"])
    assert float(ref["ns_kept"]) == 1.0
    assert len(rows) == 2 and "| mlp_down | 0 |" in table  # block 0 printed as a key, not 0.000
    for r in rows:
        assert float(r["ns_kept"]) == pytest.approx(min(1.0, float(r["prob/NS"]) / ns_before))
        assert float(r["score"]) == pytest.approx(locate.edit_score(r, ppl_before, 0.10, "ns_kept"))
    assert "ns_kept" in printed.split("Wrote")[0] and "prob/NS" in printed.split("Wrote")[0]


def test_ns_kept_is_the_share_of_the_unedited_score():
    locate = load_recipe("location_sweep")
    assert locate.ns_kept(30.0, 60.0) == 0.5
    assert locate.ns_kept("45", 60.0) == 0.75  # a cell read back from the CSV
    assert locate.ns_kept(70.0, 60.0) == 1.0  # at most 1
    assert math.isnan(locate.ns_kept("", 60.0)) and math.isnan(locate.ns_kept(30.0, 0.0))
