"""The editing strategy as one option (lit_edit.strategy), and LocFT-BF in rounds."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml
from helpers import ROOT, load_recipe, make_tiny_llama, save_tiny_model

from lit_edit.data import EditDataModule, EditRequest, PromptAnswer
from lit_edit.editors import EMMET, MEMIT, ROME, AlphaEdit, DepthFirstFT, LocFTBF
from lit_edit.evaluation import EditEvaluation
from lit_edit.strategy import (
    STRATEGIES,
    EditingStrategy,
    StrategyConflict,
    apply_strategy,
    infer_strategy,
)

DOWN1 = "model.layers.1.mlp.down_proj.weight"
BATCH_EDITORS = (ROME, MEMIT, EMMET, AlphaEdit, DepthFirstFT)

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def five_requests() -> list[EditRequest]:
    facts = [
        ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
        ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs"),
        ("The capital of Japan is", "Japan", "Osaka", "Tokyo"),
        ("Toyota is a company from", "Toyota", "Canada", "Japan"),
    ]
    return [
        EditRequest(prompt=p, subject=s, target_new=t, ground_truth=g, paraphrase_prompts=(f"In short, {p}",),
                    locality=(PromptAnswer("The capital of Italy is", "Rome"),), case_id=i)
        for i, (p, s, t, g) in enumerate(facts)
    ]


def locft(model, tokenizer, **kw) -> LocFTBF:
    # a random tiny model starts near loss 10.8; min_loss 10.2 ends each round after a few epochs
    kw = {"target_modules": ["mlp.down_proj"], "layers_to_transform": [1], "lr": 1e-2, "min_loss": 10.2, **kw}
    return LocFTBF(model=model, tokenizer=tokenizer, **kw)


class Announcements(L.Callback):
    """Records the editor's per-round announcements (requests by case id) and the weights at them."""

    def __init__(self):
        self.applied, self.committed, self.at_applied, self.at_round_start = [], [], [], []

    def on_edits_applied(self, trainer, editor, requests):
        self.applied.append([r.case_id for r in requests])
        self.at_applied.append(dict(editor.model.named_parameters())[DOWN1].detach().clone())

    def on_edits_committed(self, trainer, editor, requests):
        self.committed.append([r.case_id for r in requests])

    def on_train_epoch_start(self, trainer, editor):
        if editor.num_rounds > 1 and trainer.current_epoch == editor._round_first_epoch:
            self.at_round_start.append(dict(editor.model.named_parameters())[DOWN1].detach().clone())


# ---------------------------------------------------------------------- the option


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("sequentially",), ValueError, "editing.strategy must be one of single, batched, sequential, sequential_batched"),
        ((3,), TypeError, "editing.strategy must be one of"),
        (("single", 4), ValueError, r"single edits one request at a time \(batch size 1\).*editing.strategy batched"),
        (("sequential", 8), ValueError, "sequential_batched for batches of 8"),
        (("sequential_batched",), ValueError, "sequential_batched needs a positive editing.batch_size"),
        (("sequential_batched", 0), ValueError, "editing.batch_size must be a positive integer"),
        (("batched", -2), ValueError, r"positive integer \('all' = every request"),
        (("sequential_batched", "all"), ValueError, "'all' applies to the batched strategy only"),
        (("batched", "some"), ValueError, "editing.batch_size must be a positive integer or 'all'"),
        (("batched", True), TypeError, "editing.batch_size"),
        (("batched", 2.5), TypeError, "editing.batch_size"),
    ],
)
def test_invalid_strategies_are_refused_naming_the_option(args, error, match):
    with pytest.raises(error, match=match):
        EditingStrategy(*args)


def test_strategy_names_and_batch_sizes_are_normalised():
    assert EditingStrategy("single").batch_size == 1 and EditingStrategy("sequential", 1).batch_size == 1
    assert EditingStrategy("batched").batch_size == "all" and EditingStrategy("batched", "ALL").all_requests
    assert EditingStrategy("Sequential-Batched", "16") == EditingStrategy("sequential_batched", 16)
    assert EditingStrategy.parse(None) is None
    assert EditingStrategy.parse({"strategy": "batched", "batch_size": 4}) == EditingStrategy("batched", 4)
    with pytest.raises(ValueError, match="editing.batch_size .* without editing.strategy"):
        EditingStrategy.parse(None, 4)
    assert set(STRATEGIES) == {"single", "batched", "sequential", "sequential_batched"}


@pytest.mark.parametrize(
    "name, size, accumulate, batch, timing",
    [
        ("single", None, False, 1, "immediate"),
        ("batched", None, False, "all", "immediate"),
        ("batched", 8, False, 8, "immediate"),
        ("sequential", None, True, 1, "after-all"),
        ("sequential_batched", 16, True, 16, "after-all"),
    ],
)
def test_mapping_of_each_strategy_for_each_editor_family(name, size, accumulate, batch, timing):
    s = EditingStrategy(name, size)
    assert (s.accumulate, s.timing) == (accumulate, timing)
    for cls in BATCH_EDITORS:  # the dataloader batch is the edit batch (0 = all requests)
        assert s.settings(cls) == {"model.accumulate": accumulate, "data.batch_size": 0 if batch == "all" else batch,
                                   "timing": timing}, cls.__name__
    # LocFT-BF: the batch is a round; data.batch_size stays its mini-batch
    assert s.settings(LocFTBF) == {"model.accumulate": accumulate, "model.round_size": None if batch == "all" else batch,
                                   "timing": timing}


def test_old_settings_are_named_by_the_strategy_they_amount_to():
    assert infer_strategy(False, 1, 10) == ("single", 1)
    assert infer_strategy(False, 4, 10) == ("batched", 4)
    assert infer_strategy(False, 0, 10) == ("batched", "all")
    assert infer_strategy(True, 1, 10) == ("sequential", 1)
    assert infer_strategy(True, 4, 10) == ("sequential_batched", 4)
    assert infer_strategy(True, 0, 10) == ("sequential_batched", 10)  # one batch of every request, kept
    assert infer_strategy(True, 100, 10) == ("sequential_batched", 10)
    assert infer_strategy(True, None, None) == ("sequential_batched", "all")


# ---------------------------------------------------------------------- from Python


def test_apply_strategy_sets_every_setting_and_refuses_explicit_contradictions(tiny_llama, tokenizer, requests):
    editor = MEMIT(model=tiny_llama, tokenizer=tokenizer)
    dm = EditDataModule(requests=requests)
    ev = EditEvaluation(protocols=["probability"], print_table=False)
    s = apply_strategy("sequential_batched", editor, dm, [ev], batch_size=2)
    assert s == EditingStrategy("sequential_batched", 2) and editor.editing_strategy == s
    assert editor.hparams["accumulate"] is True and dm.hparams.batch_size == 2 and ev.timing == "after-all"

    editor = MEMIT(model=tiny_llama, tokenizer=tokenizer)
    dm, ev = EditDataModule(requests=requests), EditEvaluation(protocols=["probability"], print_table=False)
    apply_strategy(EditingStrategy("batched"), editor, dm, [ev])
    assert editor.hparams["accumulate"] is False and dm.hparams.batch_size == 0 and ev.timing == "immediate"
    assert editor.hparams_initial["accumulate"] is False  # what the loggers record

    with pytest.raises(StrategyConflict, match=r"sequential keeps every batch's edit \(model.accumulate true\), but "
                                               r"model.accumulate is false"):
        apply_strategy("sequential", DepthFirstFT(model=tiny_llama, tokenizer=tokenizer, accumulate=False))
    dm = EditDataModule(requests=requests, batch_size=8)
    editor = ROME(model=tiny_llama, tokenizer=tokenizer)
    one_at_a_time = r"editing.strategy single edits one request at a time \(data.batch_size 1\), but data.batch_size is 8"
    with pytest.raises(StrategyConflict, match=one_at_a_time):
        apply_strategy("single", editor, dm)
    assert editor.hparams["accumulate"] is True and editor.editing_strategy is None  # nothing changed
    with pytest.raises(StrategyConflict, match=r"scores every request on the final model \(timing after-all\), but "
                                               r"timing is immediate \(EditEvaluation\)"):
        apply_strategy("sequential", editor, None, [EditEvaluation(protocols=["probability"], timing="immediate")])
    with pytest.raises(StrategyConflict, match="lora_rank"):
        apply_strategy("single", DepthFirstFT(model=tiny_llama, tokenizer=tokenizer, lora_rank=2))

    ft = locft(tiny_llama, tokenizer)
    dm = EditDataModule(requests=requests, batch_size=8)
    apply_strategy("sequential_batched", ft, dm, batch_size=2)
    assert ft.hparams["round_size"] == 2 and ft.hparams["accumulate"] is True
    assert dm.hparams.batch_size == 8  # LocFT-BF's mini-batch is not the strategy's
    with pytest.raises(StrategyConflict, match="model.round_size"):
        apply_strategy("sequential_batched", locft(tiny_llama, tokenizer, round_size=3), batch_size=2)


def test_a_strategy_changed_after_it_was_applied_is_refused_at_fit(tiny_llama, tokenizer, requests):
    editor = locft(tiny_llama, tokenizer)
    ev = EditEvaluation(protocols=["token_accuracy"], print_table=False)
    apply_strategy("single", editor, None, [ev])
    ev.timing = "after-all"
    with pytest.raises(StrategyConflict, match="timing is after-all"):
        trainer(max_epochs=1, callbacks=[ev]).fit(editor, datamodule=EditDataModule(requests=requests))


# ---------------------------------------------------------------------- LocFT-BF in rounds


@pytest.mark.parametrize("n, size", [(4, 2), (5, 2)])
def test_sequential_batched_locft_equals_its_rounds_fitted_one_after_another(tokenizer, n, size):
    """One fit in rounds of ``size`` = separate fits of each chunk, in data order, on the same model
    with edits kept (each its own epochs, early stop and Adam state): bit for bit."""
    reqs, epochs = five_requests()[:n], 6
    base = make_tiny_llama(len(tokenizer))
    original = weights(base)
    rounds_model = make_tiny_llama(len(tokenizer))
    editor = locft(rounds_model, tokenizer)
    seen = Announcements()
    dm = EditDataModule(requests=reqs, batch_size=1, shuffle=True, seed=3)
    apply_strategy("sequential_batched", editor, dm, batch_size=size)
    trainer(max_epochs=epochs, callbacks=[seen]).fit(editor, datamodule=dm)

    chunks = [reqs[i:i + size] for i in range(0, n, size)]
    assert [h["requests"] for h in editor.round_history] == [len(c) for c in chunks]
    assert any(h["stopped"] == "min_loss" and h["epochs"] < epochs for h in editor.round_history)  # rounds stop on their own
    assert seen.committed == [[r.case_id for r in c] for c in chunks] == seen.applied

    alone_model = make_tiny_llama(len(tokenizer))
    alone = locft(alone_model, tokenizer)
    history = []
    for chunk in chunks:
        trainer(max_epochs=epochs).fit(alone, datamodule=EditDataModule(requests=chunk, batch_size=1, shuffle=True, seed=3))
        history += alone.round_history
    assert [(h["epochs"], h["loss"]) for h in history] == [(h["epochs"], h["loss"]) for h in editor.round_history]
    in_rounds, one_by_one = weights(rounds_model), weights(alone_model)
    assert not torch.equal(in_rounds[DOWN1], original[DOWN1])
    for name, value in original.items():
        assert torch.equal(in_rounds[name], one_by_one[name]), name  # bit for bit
        if name != DOWN1:
            assert torch.equal(in_rounds[name], value), name  # only the masked tensor changed
    assert editor.touched == [DOWN1]


@pytest.mark.parametrize("name, size, n_rounds", [("single", None, 3), ("batched", 2, 2), ("batched", "all", 1)])
def test_single_and_batched_locft_restore_bit_exactly_after_each_round(tokenizer, requests, tmp_path, name, size, n_rounds):
    model = make_tiny_llama(len(tokenizer))
    original = weights(model)
    editor = locft(model, tokenizer, min_loss=0.0)
    seen = Announcements()
    ev = EditEvaluation(protocols=["probability", "token_accuracy"], print_table=False, summary_dir=str(tmp_path))
    dm = EditDataModule(requests=requests, batch_size=2, seed=1)
    apply_strategy(name, editor, dm, [ev], batch_size=size)
    assert ev.timing == "immediate"
    trainer(max_epochs=3, callbacks=[ev, seen]).fit(editor, datamodule=dm)
    assert len(editor.round_history) == n_rounds and not any(h["kept"] for h in editor.round_history)
    assert seen.committed == []  # nothing became permanent
    assert sorted(i for ids in seen.applied for i in ids) == [0, 1, 2]
    for w in seen.at_applied:  # each round's edit was in the model when it was scored...
        assert not torch.equal(w, original[DOWN1])
    for w in seen.at_round_start:  # ...and every round started from the original weights
        assert torch.equal(w, original[DOWN1])
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    assert ev.after["prob/EM"] > ev.before["prob/EM"]  # the immediate figures saw the edits
    summary = json.loads(ev.summary_path.read_text())
    assert summary["strategy"]["name"] == name and summary["strategy"]["batches"] == n_rounds
    assert summary["evaluation_timing"] == "immediate" and summary["strategy"]["evaluation_timing"] == "immediate"


def test_rounds_resume_from_a_checkpoint_in_the_right_round(tokenizer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    reqs = five_requests()[:4]

    def run(ckpt=None, ckpt_dir=None, size=2):
        model = make_tiny_llama(len(tokenizer))
        editor = locft(model, tokenizer)
        dm = EditDataModule(requests=reqs, batch_size=1, shuffle=True, seed=3)
        apply_strategy("sequential_batched", editor, dm, batch_size=size)
        callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)] if ckpt_dir else []
        trainer(max_epochs=6, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks).fit(editor, datamodule=dm, ckpt_path=ckpt)
        return weights(model)[DOWN1], editor

    full, editor = run(ckpt_dir=tmp_path)
    first_round = editor.round_history[0]["epochs"]
    ckpts = {int(p.stem.split("-")[0].split("=")[1]): p for p in tmp_path.glob("*.ckpt")}
    assert len(ckpts) == sum(h["epochs"] for h in editor.round_history)
    for epoch in (0, first_round - 1, first_round, max(ckpts) - 1):  # in round 1, at its end, in round 2
        resumed, again = run(ckpt=str(ckpts[epoch]))
        assert torch.equal(resumed, full), epoch
        assert again.round_history == editor.round_history
    with pytest.raises(ValueError, match=r"cannot resume the checkpoint's LocFT-BF rounds: round_size 3 \(the checkpoint's: 2\)"):
        run(ckpt=str(ckpts[0]), size=3)


def test_locft_round_options_are_checked(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="round_size must be >= 1"):
        locft(tiny_llama, tokenizer, round_size=0)
    with pytest.raises(TypeError, match="accumulate must be true or false"):
        locft(tiny_llama, tokenizer, accumulate="no")
    with pytest.raises(ValueError, match="lora_rank"):
        locft(tiny_llama, tokenizer, round_size=2, lora_rank=2)
    editor = locft(tiny_llama, tokenizer, round_size=1)
    with pytest.raises(ValueError, match="max_steps"):
        trainer(max_epochs=2, max_steps=3).fit(editor, datamodule=EditDataModule(requests=five_requests()[:2]))
    with pytest.raises(ValueError, match="min_epochs=3"):
        trainer(max_epochs=2, min_epochs=3).fit(editor, datamodule=EditDataModule(requests=five_requests()[:2]))
    with pytest.raises(RuntimeError, match="needs an EditDataModule"):
        trainer(max_epochs=2).fit(editor, train_dataloaders=EditDataModule(requests=five_requests()[:2]).train_dataloader())


# ---------------------------------------------------------------------- records


def test_strategy_is_in_the_summary_table_hparams_and_saved_edit(tokenizer, tmp_path):
    model = make_tiny_llama(len(tokenizer))
    editor = locft(model, tokenizer)
    ev = EditEvaluation(protocols=["token_accuracy"], print_table=False, summary_dir=str(tmp_path))
    dm = EditDataModule(requests=five_requests()[:4], batch_size=1)
    apply_strategy("sequential_batched", editor, dm, [ev], batch_size=2)
    trainer(max_epochs=2, callbacks=[ev]).fit(editor, datamodule=dm)
    summary = json.loads(ev.summary_path.read_text())
    assert summary["editor"] == "LocFTBF" and summary["model"] == "tiny-llama-seed0"
    assert summary["strategy"] == {"name": "sequential_batched", "batch_size": 2, "accumulate": True,
                                   "evaluation_timing": "after-all", "batches": 2, "declared": True,
                                   "batch_option": "model.round_size"}
    assert summary["data"]["source"] == "given requests" and summary["data"]["num_requests"] == 4
    header = ev.table().splitlines()[0]
    for text in ("LocFTBF", "strategy: sequential_batched, batch size 2", "timing: after-all", "model: tiny-llama-seed0",
                 "data: given requests (4 requests)"):
        assert text in header, header
    assert editor.hparams_initial["strategy"]["name"] == "sequential_batched"  # logged hyperparameters
    assert "strategy" not in editor.hparams  # not a constructor argument (checkpoints reload)
    path = editor.save_edit(tmp_path / "edit")
    meta = json.loads((path / "edit.json").read_text())
    assert meta["strategy"]["name"] == "sequential_batched" and meta["strategy"]["batch_size"] == 2
    assert meta["data"]["num_requests"] == 4 and meta["editor"].endswith("LocFTBF")


def test_old_settings_are_recorded_as_the_strategy_they_make(tiny_llama, tokenizer, requests, tmp_path):
    ev = EditEvaluation(protocols=["token_accuracy"], print_table=False, summary_dir=str(tmp_path), timing="immediate")
    df = DepthFirstFT(model=tiny_llama, tokenizer=tokenizer, target_modules=["mlp.down_proj"], layers_to_transform=[1],
                      accumulate=False, steps=2)
    trainer(max_epochs=1, callbacks=[ev]).fit(df, datamodule=EditDataModule(requests=requests, batch_size=1, shuffle=False))
    s = ev.summary(df)["strategy"]
    assert (s["name"], s["batch_size"], s["declared"], s["evaluation_timing"], s["batches"]) == ("single", 1, False, "immediate", 3)
    assert "strategy: single (from accumulate and the batch size)" in ev.table()

    editor = locft(make_tiny_llama(len(tokenizer)), tokenizer)  # the published LocFT-BF: one round of every request
    ev = EditEvaluation(protocols=["token_accuracy"], print_table=False, summary_dir=str(tmp_path))
    trainer(max_epochs=1, callbacks=[ev]).fit(editor, datamodule=EditDataModule(requests=requests, batch_size=2))
    s = ev.summary(editor)["strategy"]
    assert (s["name"], s["batch_size"], s["accumulate"], s["batches"]) == ("sequential_batched", 3, True, 1)
    assert len(editor.round_history) == 1 and editor.round_history[0]["stopped"] == "end of fit"


# ---------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def cli_args(tmp_path, tiny_dir, *extra):
    return [
        f"--model.model={tiny_dir}", "--data.limit=4", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", f"--save_dir={tmp_path / 'edit'}", *extra,
    ]


def closed_form_cli(recipe: str, tmp_path, tiny_dir, *extra):
    from lit_edit.cli import EditCLI

    cls = {"rome": ROME, "memit": MEMIT, "emmet": EMMET, "alphaedit": AlphaEdit}[recipe]
    return EditCLI(cls, EditDataModule, run=False, args=cli_args(tmp_path, tiny_dir, *extra),
                   parser_kwargs={"default_config_files": [str(ROOT / "recipes" / f"{recipe}.yaml")]})


@pytest.mark.parametrize(
    "recipe, args, accumulate, batch, timing",
    [
        ("rome", [], True, 1, "after-all"),  # no strategy: the recipe's settings, unchanged
        ("memit", [], True, 0, "after-all"),
        ("rome", ["--editing.strategy=single"], False, 1, "immediate"),
        ("memit", ["--editing.strategy=batched"], False, 0, "immediate"),
        ("emmet", ["--editing.strategy=batched", "--editing.batch_size=2"], False, 2, "immediate"),
        ("alphaedit", ["--editing.strategy=sequential"], True, 1, "after-all"),
        ("memit", ["--editing.strategy=sequential_batched", "--editing.batch_size=2"], True, 2, "after-all"),
    ],
)
def test_cli_strategy_sets_the_closed_form_settings(tmp_path, tiny_dir, recipe, args, accumulate, batch, timing):
    cli = closed_form_cli(recipe, tmp_path, tiny_dir, *args)
    ev = next(c for c in cli.trainer.callbacks if isinstance(c, EditEvaluation))
    assert (cli.model.hparams["accumulate"], cli.datamodule.hparams.batch_size, ev.timing) == (accumulate, batch, timing)
    assert (cli.model.editing_strategy is None) == (not args)
    cfg = cli.config
    assert (cfg["model.accumulate"], cfg["data.batch_size"]) == (accumulate, batch)  # what config.yaml records
    assert cfg["trainer.callbacks"][0]["init_args"]["timing"] == timing


@pytest.mark.parametrize(
    "args, match",
    [
        (["--editing.strategy=sequential", "--model.accumulate=false"], "editing.strategy sequential .* model.accumulate is false"),
        (["--editing.strategy=single", "--model.accumulate=true"], "editing.strategy single .* model.accumulate is true"),
        (["--editing.strategy=batched", "--editing.batch_size=4", "--data.batch_size=2"], "data.batch_size is 2"),
        (["--editing.strategy=sequential", "--trainer.callbacks=[{class_path: lit_edit.evaluation.EditEvaluation, "
          "init_args: {timing: immediate}}]"], r"timing is immediate \(trainer.callbacks: EditEvaluation\)"),
        (["--editing.strategy=single", "--trainer.callbacks=[{class_path: lit_edit.evaluation.EditEvaluation, "
          "init_args: {timing: after-all}}]"], "timing is after-all"),
        (["--editing.strategy=one_by_one"], "editing.strategy must be one of single, batched, sequential, sequential_batched"),
        (["--editing.strategy=sequential_batched"], "needs a positive editing.batch_size"),
        (["--editing.batch_size=4"], "without editing.strategy"),
    ],
)
def test_cli_refuses_a_setting_that_contradicts_the_strategy(tmp_path, tiny_dir, capsys, args, match):
    import re

    with pytest.raises(SystemExit):
        closed_form_cli("memit", tmp_path, tiny_dir, *args)
    assert re.search(match, capsys.readouterr().err), args


def test_locft_recipe_in_rounds_records_the_strategy_everywhere(tmp_path, tiny_dir, capsys):
    recipe = load_recipe("locft_bf")
    cli = recipe.main(cli_args(
        tmp_path, tiny_dir, "--model.target_modules=[mlp.down_proj]", "--model.layers_to_transform=[0]", "--model.lr=1e-2",
        "--model.preservation=0", "--data.batch_size=1", "--trainer.max_epochs=2",
        "--editing.strategy=sequential_batched", "--editing.batch_size=2",
        "--trainer.callbacks=[{class_path: lit_edit.evaluation.EditEvaluation, init_args: {protocols: [token_accuracy]}}]",
    ))
    assert cli.model.hparams["round_size"] == 2 and cli.model.num_rounds == 2 and len(cli.model.round_history) == 2
    assert cli.datamodule.hparams.batch_size == 1  # the mini-batch
    config = yaml.safe_load(next((tmp_path / "logs").rglob("config.yaml")).read_text())
    assert config["editing"] == {"strategy": "sequential_batched", "batch_size": 2}
    assert config["model"]["round_size"] == 2 and config["model"]["accumulate"] is True
    assert config["trainer"]["callbacks"][0]["init_args"]["timing"] == "after-all"
    summary = json.loads(next((tmp_path / "logs").rglob("summary.json")).read_text())
    assert summary["strategy"]["name"] == "sequential_batched" and summary["strategy"]["batch_size"] == 2
    assert summary["editor"] == "LocFTBF" and summary["data"]["source"] == "demo"
    hparams = yaml.safe_load(next((tmp_path / "logs").rglob("hparams.yaml")).read_text())
    assert hparams["strategy"]["name"] == "sequential_batched" and hparams["round_size"] == 2
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert meta["strategy"]["name"] == "sequential_batched" and meta["data"]["source"] == "demo"
    out = capsys.readouterr().out
    assert "LocFTBF, strategy: sequential_batched, batch size 2, timing: after-all" in out


def test_console_script_strategy_on_a_chosen_editor(tmp_path, tiny_dir):
    from lit_edit.cli import main

    main(["fit", "--model", "DepthFirstFT", *cli_args(tmp_path, tiny_dir), "--model.init_args.target_modules=[mlp.down_proj]",
          "--model.init_args.layers_to_transform=[1]", "--model.init_args.steps=2", "--data.limit=2",
          "--editing.strategy=single", "--trainer.callbacks=[]"])
    config = yaml.safe_load(next((tmp_path / "logs").rglob("config.yaml")).read_text())
    assert config["model"]["init_args"]["accumulate"] is False and config["data"]["batch_size"] == 1
    assert not (tmp_path / "edit").exists()  # single editing restores every edit: nothing to save
