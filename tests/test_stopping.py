"""LocFT-BF's stopping rules: the extension's patience and the best epoch's tensors (keep_best)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data import EditDataModule
from lit_edit.editors import LocFTBF

NAME = "model.layers.1.mlp.down_proj.weight"


class Dipped(LocFTBF):
    """LocFT-BF whose reported edit loss is lowered by ``dips[epoch]`` (a constant: the gradient,
    and so the fit, is unchanged), to place the lowest-loss epoch where a test wants it."""

    dips: dict[int, float] = {}

    def training_loss(self, batch):
        edit, loss = super().training_loss(batch)
        return edit - self.dips.get(self.current_epoch, 0.0), loss


def editor(tok, dips=None, **kw):
    kw.setdefault("target_modules", ["mlp.down_proj"])
    kw.setdefault("layers_to_transform", [1])
    kw.setdefault("lr", 1e-2)
    kw.setdefault("min_loss", 0.0)
    torch.manual_seed(0)
    ed = Dipped(model=make_tiny_llama(len(tok)), tokenizer=tok, **kw)
    ed.dips = dict(dips or {})
    return ed


class EpochTensors(L.Callback):
    """The learning rate at the start of every epoch; the tuned tensor and the epoch's mean edit
    loss after it (before the editor's own epoch-end rule, which may close the round and put
    other tensors back)."""

    def __init__(self):
        self.rates: list[float] = []
        self.tensors: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer, ed):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, ed):
        self.tensors.append(dict(ed.model.named_parameters())[NAME].detach().clone())
        self.losses.append(ed._epoch_loss / ed._epoch_count)


def fit(ed, requests, epochs, checkpoints=None, ckpt_path=None):
    """Fit ``ed`` on ``requests`` in order; ``checkpoints``: a folder to save every epoch in
    (``epoch=N.ckpt``); ``ckpt_path``: a checkpoint to resume from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen = EpochTensors()
    callbacks = [seen]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=checkpoints is not None, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, max_epochs=epochs, default_root_dir=checkpoints,
              callbacks=callbacks).fit(
        ed, datamodule=EditDataModule(requests=list(requests), batch_size=1, shuffle=False), ckpt_path=ckpt_path)
    return seen


def weight(ed) -> torch.Tensor:
    return dict(ed.model.named_parameters())[NAME].detach()


def test_keep_best_ends_on_the_tensors_of_the_lowest_loss_epoch(tokenizer, requests):
    # the loss read at epoch 4 (index 3) is lowered by 5 nats: the fit's best epoch, not its last
    ed = editor(tokenizer, dips={3: 5.0}, keep_best=True)
    seen = fit(ed, requests, epochs=8)
    best = min(range(8), key=seen.losses.__getitem__)
    assert best == 3
    h = ed.round_history[-1]
    assert h["best_epoch"] == best + 1 and h["best_loss"] == pytest.approx(seen.losses[best])
    assert torch.equal(weight(ed), seen.tensors[best])  # bit-exact: the copy taken after that epoch
    assert not torch.equal(weight(ed), seen.tensors[-1])
    # without keep_best the same fit ends on its last epoch's tensors
    ed = editor(tokenizer, dips={3: 5.0})
    seen_plain = fit(ed, requests, epochs=8)
    assert seen_plain.losses == pytest.approx(seen.losses, rel=1e-6)
    assert torch.equal(weight(ed), seen_plain.tensors[-1]) and "best_epoch" not in ed.round_history[-1]


def test_keep_best_applies_per_round(tokenizer, requests):
    ed = editor(tokenizer, dips={1: 5.0, 9: 5.0}, keep_best=True, round_size=2)  # epoch 2 of each round
    seen = fit(ed, requests, epochs=6)
    rounds = ed.round_history
    assert len(rounds) == 2 and all(r["epochs"] == 6 for r in rounds)
    first, second = seen.losses[:6], seen.losses[6:]
    assert rounds[0]["best_epoch"] == 1 + min(range(6), key=first.__getitem__) == 2
    assert rounds[1]["best_epoch"] == 1 + min(range(6), key=second.__getitem__) == 4
    # the second round starts from the first round's best tensors and ends on its own best
    assert torch.equal(weight(ed), seen.tensors[6 + rounds[1]["best_epoch"] - 1])


def test_patience_lets_the_extension_run_past_epochs_that_do_not_fall(tokenizer, requests):
    # no epoch falls by 99%: patience P runs P - 1 epochs past max_epochs, then stops
    got = {}
    for patience in (1, 3):
        ed = editor(tokenizer, lr=3e-3, extend_epochs=6, extend_min_drop=0.99, extend_patience=patience)
        fit(ed, requests, epochs=2)
        got[patience] = ed.round_history[-1]
    assert got[1]["epochs"] == 2
    assert got[3]["epochs"] == 4 and got[3]["stopped"] == "loss no longer falling"


def test_patience_counts_falls_below_the_best_loss_not_the_epoch_before(tokenizer):
    ed = editor(tokenizer, extend_epochs=20, extend_min_drop=0.1, extend_patience=2)
    # 0.70 falls 12.5% below the epoch before (0.80) but not 10% below the best before it (0.70 vs 0.75)
    decisions = []
    for epoch, loss in enumerate([1.0, 0.75, 0.80, 0.70, 0.62, 0.64, 0.60], start=1):
        ed._round_epochs = epoch
        ed._track_best(loss)
        decisions.append((ed._since_fall, ed._extends(epoch, 1, loss)))
    assert decisions == [(0, False), (0, True), (1, True), (2, False), (0, True), (1, True), (2, False)]
    assert ed._best_loss == 0.60 and ed._best_epoch == 7


def test_best_epoch_state_travels_in_checkpoints(tokenizer, requests):
    ed = editor(tokenizer, keep_best=True, extend_epochs=3, extend_patience=2)
    ed._round_epochs = 3
    ed._track_best(0.5)
    ed._best_state = {NAME: torch.randn(4, 4)}
    ckpt: dict = {"state_dict": {}}
    ed.on_save_checkpoint(ckpt)
    other = editor(tokenizer, keep_best=True, extend_epochs=3, extend_patience=2)
    other.on_load_checkpoint(ckpt)
    assert (other._best_loss, other._best_epoch, other._since_fall) == (0.5, 3, 0)
    assert torch.equal(other._best_state[NAME], ed._best_state[NAME])


def test_plateau_lr_decay_halves_the_rate_after_epochs_that_do_not_fall(tokenizer, requests, caplog):
    # no epoch falls by 99% below the best before it: every epoch after the first halves the rate
    with caplog.at_level("INFO", logger="lit_edit.editors.finetune"):
        seen = fit(editor(tokenizer, lr=4e-3, extend_min_drop=0.99, plateau_lr_decay=0.5), requests, epochs=4)
    assert seen.rates == pytest.approx([4e-3, 4e-3, 2e-3, 1e-3])
    # each decay is logged right after the loss line of the epoch that caused it
    lines = [r.getMessage() for r in caplog.records if "mean loss" in r.getMessage() or "learning rate now" in r.getMessage()]
    assert lines[0].startswith("epoch 0: mean loss") and lines[1].startswith("epoch 1: mean loss")
    assert lines[2].startswith("no 99.0% fall in the epoch loss for 1 epoch(s)")
    assert lines[2].endswith("learning rate now 0.002")
    # the same fit at a constant rate moves the tensor further in its last epoch than the decayed one
    seen_plain = fit(editor(tokenizer, lr=4e-3, extend_min_drop=0.99), requests, epochs=4)
    assert seen_plain.rates == pytest.approx([4e-3] * 4)
    assert torch.equal(seen_plain.tensors[1], seen.tensors[1])  # identical until the first decay
    last = (seen.tensors[3] - seen.tensors[2]).abs().max()
    last_plain = (seen_plain.tensors[3] - seen_plain.tensors[2]).abs().max()
    assert 0 < last < 0.6 * last_plain


def test_plateau_lr_decay_starts_each_round_at_the_base_rate(tokenizer, requests):
    ed = editor(tokenizer, lr=4e-3, extend_min_drop=0.99, plateau_lr_decay=0.5, round_size=2)
    seen = fit(ed, requests, epochs=3)
    assert len(ed.round_history) == 2
    assert seen.rates == pytest.approx([4e-3, 4e-3, 2e-3] * 2)


def test_a_resumed_fit_goes_on_at_the_decayed_rate(tokenizer, requests, tmp_path):
    def edit():
        return editor(tokenizer, lr=4e-3, extend_min_drop=0.99, plateau_lr_decay=0.5)

    whole_ed = edit()
    whole = fit(whole_ed, requests, epochs=4, checkpoints=tmp_path)
    ed = edit()  # as if killed after epoch 2, whose loss decayed the lr
    resumed = fit(ed, requests, epochs=4, checkpoints=tmp_path, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert whole.rates == pytest.approx([4e-3, 4e-3, 2e-3, 1e-3])
    assert resumed.rates == pytest.approx(whole.rates[2:])
    assert torch.equal(weight(ed), weight(whole_ed))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"extend_patience": 0}, ValueError, "extend_patience must be >= 1"),
        ({"extend_patience": 1.5}, TypeError, "extend_patience"),
        ({"keep_best": "yes"}, TypeError, "keep_best"),
        ({"plateau_lr_decay": 0.0}, ValueError, r"plateau_lr_decay \(a factor.*must be > 0"),
        ({"plateau_lr_decay": 1.5}, ValueError, r"plateau_lr_decay \(a factor.*must be <= 1"),
        ({"plateau_lr_decay": "half"}, TypeError, "plateau_lr_decay"),
    ],
)
def test_stopping_options_are_checked(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        editor(tokenizer, **kwargs)
