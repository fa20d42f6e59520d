"""Fine-tuning editors on tiny random models: effects, masks, undo, save/load, resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama, write_corpus

from lit_edit.data import EditDataModule
from lit_edit.editors import DepthFirstFT, LocFTBF
from lit_edit.edits import EditMismatchError, apply_edit, load_edit
from lit_edit.masks import ParameterMask, resolve_mask

DOWN1 = "model.layers.1.mlp.down_proj.weight"


def trainer(**kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def editor(model, tok, cls=LocFTBF, **kw):
    kw.setdefault("target_modules", ["mlp.down_proj"])
    kw.setdefault("layers_to_transform", [1])
    kw.setdefault("lr", 1e-2)
    return cls(model=model, tokenizer=tok, **kw)


def fit(ed, requests, epochs=8, batch_size=100, shuffle=True, **kw):
    dm = EditDataModule(requests=list(requests), batch_size=batch_size, shuffle=shuffle)
    trainer(max_epochs=epochs, **kw).fit(ed, datamodule=dm)
    return ed


def test_locft_bf_raises_target_probability_and_changes_only_the_mask(tiny_llama, tokenizer, requests):
    before = snapshot(tiny_llama)
    ed = editor(tiny_llama, tokenizer)
    loss0 = ed.edit_loss(requests).detach()
    fit(ed, requests)
    loss1 = ed.edit_loss(requests).detach()
    assert (loss1 < loss0 - 0.5).all(), (loss0, loss1)
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {DOWN1}
    assert ed.touched == [DOWN1]


def test_restore_is_bit_exact(tiny_llama, tokenizer, requests):
    before = snapshot(tiny_llama)
    ed = fit(editor(tiny_llama, tokenizer), requests, epochs=3)
    assert not torch.equal(dict(tiny_llama.named_parameters())[DOWN1], before[DOWN1])
    ed.restore()
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, before[n]), n
    assert ed.touched == []


def test_save_load_apply_roundtrip_and_mismatch(tiny_llama, tokenizer, requests, tmp_path):
    ed = fit(editor(tiny_llama, tokenizer), requests, epochs=3)
    ed.save_edit(tmp_path / "edit")
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert list(meta["tensors"]) == [DOWN1]
    assert meta["editor"].endswith("LocFTBF") and meta["init_args"]["lr"] == 1e-2
    assert meta["base_model"] == "tiny-llama-seed0"

    ids = tokenizer(["The Eiffel Tower is located in the city of"], return_tensors="pt").input_ids
    with torch.no_grad():
        edited_logits = tiny_llama(ids).logits

    fresh = make_tiny_llama(len(tokenizer), seed=0)
    original_logits = fresh(ids).logits.detach()
    originals = apply_edit(fresh, tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, edited_logits)
    # applying twice is refused: the tensor no longer matches the recorded original
    with pytest.raises(EditMismatchError, match="differs"):
        apply_edit(fresh, tmp_path / "edit")
    with torch.no_grad():
        dict(fresh.named_parameters())[DOWN1].copy_(originals[DOWN1])
        assert torch.equal(fresh(ids).logits, original_logits)

    other = make_tiny_llama(len(tokenizer), seed=1)
    other_before = snapshot(other)
    with pytest.raises(EditMismatchError, match="refusing"):
        apply_edit(other, tmp_path / "edit")
    assert all(torch.equal(p, other_before[n]) for n, p in other.named_parameters())  # nothing written

    loaded, _ = load_edit(tmp_path / "edit", model=make_tiny_llama(len(tokenizer), seed=0), tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, edited_logits)


def test_export_writes_plain_merged_checkpoint(tiny_llama, tokenizer, requests, tmp_path):
    from transformers import AutoModelForCausalLM

    ed = fit(editor(tiny_llama, tokenizer), requests, epochs=2)
    ed.export(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(dict(reloaded.named_parameters())[DOWN1], dict(tiny_llama.named_parameters())[DOWN1])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_element_mask_limits_changes_to_masked_elements(tiny_llama, tokenizer, requests):
    w0 = dict(tiny_llama.named_parameters())[DOWN1].detach().clone()
    mask = torch.zeros_like(w0, dtype=torch.bool)
    mask[:8, :] = True  # first 8 output rows only
    ed = editor(tiny_llama, tokenizer, element_masks={DOWN1: mask})
    fit(ed, requests, epochs=3)
    w1 = dict(tiny_llama.named_parameters())[DOWN1].detach()
    assert torch.equal(w1[~mask], w0[~mask])
    assert not torch.equal(w1[mask], w0[mask])


def test_depth_first_linf_constraint_holds_after_every_step(tiny_llama, tokenizer, requests):
    eps = 1e-3
    ed = editor(tiny_llama, tokenizer, cls=DepthFirstFT, linf_eps=eps, steps=5)
    w0 = dict(tiny_llama.named_parameters())[DOWN1].detach().clone()

    class Check(L.Callback):
        steps = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            w = dict(tiny_llama.named_parameters())[DOWN1].detach()
            assert (w - w0).abs().max() <= eps + 1e-7
            Check.steps += 1

    orig_step = ed.project

    def checked_project():
        orig_step()
        w = dict(tiny_llama.named_parameters())[DOWN1].detach()
        assert (w - w0).abs().max() <= eps + 1e-7

    ed.project = checked_project
    fit(ed, requests, epochs=1, batch_size=1, shuffle=False, callbacks=[Check()])
    w = dict(tiny_llama.named_parameters())[DOWN1].detach()
    assert Check.steps == len(requests)
    assert (w - w0).abs().max() > eps / 2  # the constraint was active, not vacuous


def test_depth_first_equals_breadth_first_for_one_request(tokenizer, requests):
    one = requests[:1]
    m_bf, m_df = make_tiny_llama(len(tokenizer)), make_tiny_llama(len(tokenizer))
    bf = editor(m_bf, tokenizer, lr=5e-3, min_loss=1e-2)
    df = editor(m_df, tokenizer, cls=DepthFirstFT, lr=5e-3, min_loss=1e-2, steps=6)
    fit(bf, one, epochs=6, batch_size=1)
    fit(df, one, epochs=1, batch_size=1)
    w_bf = dict(m_bf.named_parameters())[DOWN1]
    w_df = dict(m_df.named_parameters())[DOWN1]
    assert not torch.equal(w_bf, dict(make_tiny_llama(len(tokenizer)).named_parameters())[DOWN1])
    torch.testing.assert_close(w_bf, w_df, rtol=0, atol=1e-7)


def test_depth_first_resume_after_interruption_matches_uninterrupted(tokenizer, requests, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Interrupt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("simulated crash")

    def run(crash=False, ckpt=None, ckpt_dir=None):
        L.seed_everything(0)
        model = make_tiny_llama(len(tokenizer))
        ed = editor(model, tokenizer, cls=DepthFirstFT, steps=4)
        callbacks = [Interrupt()] if crash else []
        if ckpt_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1))
        dm = EditDataModule(requests=list(requests), batch_size=1, shuffle=False)
        t = trainer(max_epochs=1, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks)
        if crash:
            with pytest.raises(RuntimeError, match="simulated crash"):
                t.fit(ed, datamodule=dm)
        else:
            t.fit(ed, datamodule=dm, ckpt_path=ckpt)
        return model, ed

    full, _ = run()
    run(crash=True, ckpt_dir=tmp_path)
    ckpts = sorted(tmp_path.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert ckpts, "no checkpoint written"
    state = torch.load(ckpts[-1], weights_only=False)
    assert set(state["state_dict"]) == {"model." + DOWN1}  # only the edited tensor is checkpointed
    assert len(state["lit_edit_done"]) == 2
    resumed, ed = run(ckpt=str(ckpts[-1]))
    assert len(ed._done) == len(requests)
    torch.testing.assert_close(dict(resumed.named_parameters())[DOWN1], dict(full.named_parameters())[DOWN1], rtol=0, atol=0)


def test_breadth_first_resume_at_epoch_boundary_matches(tokenizer, requests, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs, ckpt=None, ckpt_dir=None):
        model = make_tiny_llama(len(tokenizer))
        ed = editor(model, tokenizer, min_loss=0.0)
        cbs = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)] if ckpt_dir else []
        dm = EditDataModule(requests=list(requests), batch_size=2, shuffle=True, seed=3)
        trainer(max_epochs=epochs, enable_checkpointing=bool(cbs), callbacks=cbs).fit(ed, datamodule=dm, ckpt_path=ckpt)
        return model

    full = run(4)
    run(2, ckpt_dir=tmp_path)
    resumed = run(4, ckpt=str(sorted(tmp_path.glob("*.ckpt"))[-1]))
    torch.testing.assert_close(dict(resumed.named_parameters())[DOWN1], dict(full.named_parameters())[DOWN1], rtol=0, atol=0)


def test_resumed_fit_keeps_the_unedited_evaluation(tokenizer, requests, tmp_path):
    """A fit resumed from a checkpoint compares with the unedited model, not the half-edited one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_edit.evaluation import EditEvaluation

    def run(epochs, ckpt=None, ckpt_dir=None):
        model = make_tiny_llama(len(tokenizer))
        ed = editor(model, tokenizer, min_loss=0.0)
        ev = EditEvaluation(protocols=["probability", "token_accuracy"], print_table=False, summary_dir=str(tmp_path))
        cbs = [ev] + ([ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)] if ckpt_dir else [])
        dm = EditDataModule(requests=list(requests), batch_size=2, shuffle=True, seed=3)
        trainer(max_epochs=epochs, enable_checkpointing=bool(ckpt_dir), callbacks=cbs).fit(ed, datamodule=dm, ckpt_path=ckpt)
        return ev

    first = run(3, ckpt_dir=tmp_path / "ckpt")
    assert first.after["tok_acc/reliability"] > first.before["tok_acc/reliability"]  # the edit moved it
    resumed = run(4, ckpt=str(sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]))
    assert resumed.before == first.before  # not re-measured on the partly edited model
    assert resumed.reference.locality_argmax.keys() == first.reference.locality_argmax.keys()
    for key, ids in first.reference.locality_argmax.items():
        assert torch.equal(resumed.reference.locality_argmax[key], ids)


def test_lora_variant_trains_adapter_and_merges_into_masked_tensor(tiny_llama, tokenizer, requests, tmp_path):
    before = snapshot(tiny_llama)
    ed = editor(tiny_llama, tokenizer, lora_rank=4, lr=1e-2)
    loss0 = ed.edit_loss(requests).detach()
    fit(ed, requests, epochs=8)
    assert not any("lora" in n for n, _ in tiny_llama.named_parameters())  # merged and unloaded
    assert (ed.edit_loss(requests).detach() < loss0).all()
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {DOWN1}
    ed.save_edit(tmp_path / "lora")
    ed.restore()
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())


def test_ft_l_loss_scores_every_target_token_at_the_last_prompt_position(tiny_llama, tokenizer):
    from lit_edit.data import EditRequest
    from lit_edit.losses import ft_loss

    req = EditRequest(prompt="The capital of France is", target_new="New York City", case_id="x")
    loss = ft_loss(tiny_llama, tokenizer, [req], kind="ft_l", append_eos=False)
    p_ids = tokenizer(req.prompt).input_ids
    t_ids = tokenizer(" New York City", add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = tiny_llama(torch.tensor([p_ids + t_ids])).logits[0, len(p_ids) - 1].log_softmax(-1)
    expected = -logp[t_ids].mean()
    torch.testing.assert_close(loss[0], expected, rtol=1e-5, atol=1e-5)


def test_ft_m_loss_matches_hand_computed_target_nll_with_eos(tiny_llama, tokenizer):
    from lit_edit.data import EditRequest
    from lit_edit.losses import ft_loss

    reqs = [EditRequest(prompt="Hello there", target_new="Paris"), EditRequest(prompt="A much longer prompt here", target_new="New York")]
    loss = ft_loss(tiny_llama, tokenizer, reqs, kind="ft_m", append_eos=True)
    for i, r in enumerate(reqs):
        p = tokenizer(r.prompt).input_ids
        t = tokenizer(" " + r.target_new, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            lp = tiny_llama(torch.tensor([p + t])).logits[0].log_softmax(-1)
        expected = -torch.stack([lp[len(p) - 1 + j, tok] for j, tok in enumerate(t)]).mean()
        torch.testing.assert_close(loss[i], expected, rtol=1e-4, atol=1e-4)


def test_unknown_module_name_lists_what_exists(tiny_llama, tokenizer):
    with pytest.raises(KeyError, match=r"mlp.down_proj") as e:
        resolve_mask(tiny_llama, ParameterMask(target_modules=["mlp.dwn_proj"]))
    assert "model.layers.{i}.mlp.down_proj" in str(e.value)
    with pytest.raises(KeyError, match="entry .nope. matches no module"):
        resolve_mask(tiny_llama, ParameterMask(target_modules=["mlp.down_proj", "nope"]))
    with pytest.raises(KeyError):
        resolve_mask(tiny_llama, ParameterMask(target_modules=["mlp.down_proj"], layers_to_transform=[7]))


def test_peft_vocabulary_regex_exclude_and_layers(tiny_llama):
    sel = resolve_mask(tiny_llama, ParameterMask(target_modules=r".*layers\.0\.mlp\.\w+_proj"))
    assert set(sel) == {f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
    sel = resolve_mask(
        tiny_llama,
        ParameterMask(target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[1], exclude_modules=["up_proj"]),
    )
    assert set(sel) == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_default_location_and_lr_from_the_table(tokenizer):
    model = make_tiny_llama(len(tokenizer), layers=2)
    ed = LocFTBF(model=model, tokenizer=tokenizer)
    loc = ed.default_location()  # no table entry for a 2-block llama: the fallback, with a warning
    assert loc["target_modules"] == ["mlp.down_proj"] and loc["layers_to_transform"] == [1]
    assert ed.learning_rate == 5e-4


def test_bad_loss_name_is_refused(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="ft_m"):
        LocFTBF(model=tiny_llama, tokenizer=tokenizer, loss="ft_x")


def test_single_editing_with_immediate_evaluation(tiny_llama, tokenizer, requests, tmp_path):
    """Single editing: each request edited alone, evaluated at once, then restored."""
    from lit_edit.evaluation import EditEvaluation

    before = snapshot(tiny_llama)
    ev = EditEvaluation(protocols=["probability", "token_accuracy"], timing="immediate", print_table=False, summary_dir=str(tmp_path))
    ed = editor(tiny_llama, tokenizer, cls=DepthFirstFT, accumulate=False, steps=15, lr=3e-2)
    fit(ed, requests, epochs=1, batch_size=1, shuffle=False, callbacks=[ev])
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())  # restored after each
    assert ev.after["prob/ES"] == 100.0 and ev.after["prob/EM"] > ev.before["prob/EM"]
    assert ev.after["tok_acc/reliability"] > ev.before["tok_acc/reliability"]
    assert ev.summary()["evaluation_timing"] == "immediate"


def test_optimizer_steps_count_only_batches_that_step(tiny_llama, tokenizer, requests):
    n_batches = -(-len(requests) // 2)
    ed = fit(editor(tiny_llama, tokenizer, min_loss=0.0), requests, epochs=3, batch_size=2)
    assert ed.optimizer_steps == 3 * n_batches
    before = snapshot(tiny_llama)
    ed = fit(editor(tiny_llama, tokenizer, min_loss=1e9), requests, epochs=3, batch_size=2)
    assert ed.optimizer_steps == 0  # every batch is "converged": no step, no change
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())
    df = fit(editor(tiny_llama, tokenizer, cls=DepthFirstFT, min_loss=0.0, steps=3), requests, epochs=1, batch_size=1, shuffle=False)
    assert df.optimizer_steps == 3 * len(requests)


def test_adam_eps_scales_down_steps_of_small_gradients(tokenizer, requests):
    with pytest.raises(ValueError, match="adam_eps"):
        editor(make_tiny_llama(len(tokenizer)), tokenizer, adam_eps=0.0)
    moved = {}
    for eps in (1e-8, 1.0):
        model = make_tiny_llama(len(tokenizer))
        w0 = dict(model.named_parameters())[DOWN1].detach().clone()
        ed = fit(editor(model, tokenizer, lr=1e-2, adam_eps=eps, min_loss=0.0), requests, epochs=1, batch_size=100)
        assert ed.optimizer_steps == 1
        moved[eps] = (dict(model.named_parameters())[DOWN1].detach() - w0).abs()
    # first Adam step: lr * g / (|g| + eps): about lr for every element at eps 1e-8, far less at eps 1
    assert torch.allclose(moved[1e-8].max(), torch.tensor(1e-2), rtol=1e-3)
    assert moved[1.0].max() < 1e-3


def module_keys(model, tok, module: str, corpus: str) -> torch.Tensor:
    """Inputs of ``module`` at every token of the corpus, one text per forward (no padding)."""
    from lit_edit.data.corpus import load_texts

    got = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda m, args: got.append(args[0][0].detach()))
    with torch.no_grad():
        for text in load_texts(corpus):
            model(**tok(text, return_tensors="pt"))
    handle.remove()
    return torch.cat(got)


def relative_output_change(keys: torch.Tensor, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """E‖(W − W₀) k‖² / E‖W₀ k‖² over the rows of ``keys``."""
    return ((keys @ (w - w0).T) ** 2).sum(1).mean() / ((keys @ w0.T) ** 2).sum(1).mean()


def test_preservation_loss_matches_hand_computed_output_change(tiny_llama, tokenizer, cache):
    corpus = write_corpus(cache)
    ed = editor(tiny_llama, tokenizer, preservation=1.0, preservation_corpus=corpus)
    ed.prepare_for_editing()
    ed.prepare_preservation()
    keys = module_keys(tiny_llama, tokenizer, DOWN1.removesuffix(".weight"), corpus)
    w = dict(tiny_llama.named_parameters())[DOWN1]
    w0 = w.detach().clone()
    assert float(ed.preservation_loss().detach()) == 0.0
    torch.manual_seed(1)
    with torch.no_grad():
        w.add_(0.01 * torch.randn_like(w))
    expected = relative_output_change(keys, w.detach(), w0)
    assert expected > 0
    assert torch.allclose(ed.preservation_loss().detach(), expected, rtol=1e-4)


def test_preservation_keeps_generic_outputs_while_editing(tokenizer, requests, cache):
    corpus = write_corpus(cache)
    change = {}
    for weight in (0.0, 1.0):
        model = make_tiny_llama(len(tokenizer))
        keys = module_keys(model, tokenizer, DOWN1.removesuffix(".weight"), corpus)
        w0 = dict(model.named_parameters())[DOWN1].detach().clone()
        ed = editor(model, tokenizer, preservation=weight, preservation_corpus=corpus)
        loss0 = ed.edit_loss(requests).detach()
        fit(ed, requests, epochs=8)
        loss1 = ed.edit_loss(requests).detach()
        assert (loss1 < loss0 - 0.2).all(), (weight, loss0, loss1)  # the edits are still learned
        change[weight] = float(relative_output_change(keys, dict(model.named_parameters())[DOWN1].detach(), w0))
    assert change[1.0] < 0.1 * change[0.0], change


def test_preservation_refuses_lora_negative_weights_and_non_linear_tensors(tiny_llama, tokenizer, cache):
    with pytest.raises(ValueError, match="preservation must be >= 0"):
        editor(tiny_llama, tokenizer, preservation=-1.0)
    with pytest.raises(ValueError, match="lora_rank"):
        editor(tiny_llama, tokenizer, preservation=1.0, lora_rank=4)
    ed = editor(tiny_llama, tokenizer, target_modules=["post_attention_layernorm"], preservation=1.0, preservation_corpus=write_corpus(cache))
    ed.prepare_for_editing()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.post_attention_layernorm\.weight"):
        ed.prepare_preservation()


# --------------------------------------------------------------------------- option validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers_to_transform": [1, 99]}, ValueError, r"layers_to_transform \[99\] out of range for a model with 2 blocks"),
        ({"layers_to_transform": []}, ValueError, "layers_to_transform is empty"),
        ({"layers_to_transform": [1, 1]}, ValueError, "layers_to_transform lists block"),
        ({"layers_to_transform": [-1]}, ValueError, "layers_to_transform"),
        ({"layers_to_transform": ["1"]}, TypeError, "layers_to_transform"),
        ({"layers_to_transform": [1], "target_modules": None}, ValueError, "layers_to_transform restricts target_modules"),
        ({"target_modules": []}, ValueError, "target_modules is empty"),
        ({"lora_rank": 0}, ValueError, "lora_rank must be >= 1"),
        ({"lora_rank": 2.5}, TypeError, "lora_rank"),
        ({"lora_rank": 4, "lora_alpha": -8.0}, ValueError, "lora_alpha must be > 0"),
        ({"lora_alpha": 8.0}, ValueError, "lora_alpha .* lora_rank"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"lr": -1e-3}, ValueError, "lr must be > 0"),
        ({"lr": "abc"}, TypeError, "lr must be a number, got str 'abc'"),
        ({"min_loss": -0.1}, ValueError, "min_loss must be >= 0"),
        ({"min_loss": "0.01"}, TypeError, "min_loss"),
        ({"adam_eps": float("inf")}, ValueError, "adam_eps"),
        ({"linf_eps": -1.0}, ValueError, "linf_eps must be > 0"),
        ({"append_eos": "yes"}, TypeError, "append_eos"),
        ({"preservation": float("nan")}, ValueError, "preservation"),
        ({"preservation_texts": 0}, ValueError, "preservation_texts"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"steps": "25"}, TypeError, "steps"),
    ],
)
def test_fine_tuning_options_are_checked_at_construction(tiny_llama, tokenizer, kwargs, error, match):
    cls = DepthFirstFT if "steps" in kwargs else LocFTBF
    with pytest.raises(error, match=match):
        editor(tiny_llama, tokenizer, cls=cls, **kwargs)


def test_layers_to_transform_range_and_lora_are_checked_against_the_model(tiny_llama, tokenizer):
    ed = editor(tiny_llama, tokenizer, layers_to_transform=1, lora_rank=2, lora_alpha=4.0)  # a bare int is one block
    assert ed.hparams["layers_to_transform"] == 1
    with pytest.raises(ValueError, match="layers_to_transform is empty"):
        resolve_mask(tiny_llama, ParameterMask(target_modules=["mlp.down_proj"], layers_to_transform=[]))  # peft: every block


@pytest.mark.parametrize(
    ("cls_name", "kwargs", "error", "match"),
    [
        ("MEMIT", {"layers": [1, 1]}, ValueError, r"layers lists block\(s\) \[1\] more than once"),
        ("MEMIT", {"layers": []}, ValueError, "layers is empty"),
        ("MEMIT", {"layers": [0, 7]}, ValueError, r"layers \[7\] out of range for a model with 2 blocks"),
        ("MEMIT", {"layers": "1"}, TypeError, "layers"),
        ("ROME", {"layers": [0, 1]}, ValueError, "layers must name exactly one block for ROME"),
        ("EMMET", {"emmet_lambda": -0.1}, ValueError, "emmet_lambda must be >= 0"),
        ("EMMET", {"emmet_lambda": float("nan")}, ValueError, "emmet_lambda must be a finite number"),
        ("EMMET", {"emmet_lambda": "0.1"}, TypeError, "emmet_lambda"),
        ("MEMIT", {"accumulate": "false"}, TypeError, "accumulate"),
        ("MEMIT", {"values": {"steps": 0}}, ValueError, r"values\.steps must be >= 1"),
        ("MEMIT", {"statistics": {"n_samples": -5}}, ValueError, r"statistics\.n_samples must be >= 1"),
    ],
)
def test_closed_form_editor_options_are_checked_at_construction(tiny_llama, tokenizer, cls_name, kwargs, error, match):
    from lit_edit import editors

    with pytest.raises(error, match=match):
        getattr(editors, cls_name)(model=tiny_llama, tokenizer=tokenizer, **kwargs)


@pytest.mark.parametrize(
    ("cls_name", "kwargs", "error", "match"),
    [
        ("ValueOptions", {"kl_factor": -0.1}, ValueError, r"values\.kl_factor must be >= 0"),
        ("ValueOptions", {"weight_decay": -1.0}, ValueError, r"values\.weight_decay must be >= 0"),
        ("ValueOptions", {"clamp_norm_factor": -4.0}, ValueError, r"values\.clamp_norm_factor must be > 0"),
        ("ValueOptions", {"steps": 0}, ValueError, r"values\.steps must be >= 1"),
        ("ValueOptions", {"steps": 2.5}, TypeError, r"values\.steps must be an integer"),
        ("ValueOptions", {"batch_size": 0}, ValueError, r"values\.batch_size must be >= 1"),
        ("ValueOptions", {"lr": float("nan")}, ValueError, r"values\.lr must be a finite number"),
        ("ValueOptions", {"loss_tol": float("inf")}, ValueError, r"values\.loss_tol must be a finite number"),
        ("ValueOptions", {"kl_factor": float("nan")}, ValueError, r"values\.kl_factor"),
        ("ValueOptions", {"lr": "abc"}, TypeError, r"values\.lr must be a number"),
        ("ValueOptions", {"partial_forward": "no"}, TypeError, r"values\.partial_forward"),
        ("ValueOptions", {"prefix_cache": "yes"}, TypeError, r"values\.prefix_cache must be true, false or null"),
        ("ValueOptions", {"partial_forward": None}, TypeError, r"values\.partial_forward must be true or false"),
        ("StatisticsOptions", {"update_weight": -1.0}, ValueError, r"statistics\.update_weight must be > 0"),
        ("StatisticsOptions", {"update_weight": float("inf")}, ValueError, r"statistics\.update_weight"),
        ("StatisticsOptions", {"n_samples": 0}, ValueError, r"statistics\.n_samples must be >= 1"),
        ("StatisticsOptions", {"n_samples": -3}, ValueError, r"statistics\.n_samples must be >= 1"),
        ("StatisticsOptions", {"max_length": 1}, ValueError, r"statistics\.max_length must be >= 2"),
        ("StatisticsOptions", {"batch_size": 0}, ValueError, r"statistics\.batch_size must be >= 1"),
        ("StatisticsOptions", {"corpus": " "}, ValueError, r"statistics\.corpus"),
        ("StatisticsOptions", {"adjustment": 1}, TypeError, r"statistics\.adjustment"),
        ("TemplateOptions", {"max_per_group": -1}, ValueError, r"templates\.max_per_group must be >= 0"),
        ("TemplateOptions", {"seed": "0"}, TypeError, r"templates\.seed"),
    ],
)
def test_closed_form_option_groups_are_checked(cls_name, kwargs, error, match):
    from lit_edit.editors import closed_form

    with pytest.raises(error, match=match):
        getattr(closed_form, cls_name)(**kwargs)


def test_tied_lm_head_is_refused_before_any_work(tokenizer):
    from lit_edit.editors import LocFTBF

    model = make_tiny_llama(len(tokenizer))  # tie_word_embeddings=True: lm_head.weight is the embedding
    before = model.lm_head.weight.detach().clone()
    editor = LocFTBF(model=model, tokenizer=tokenizer, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="lm_head.weight.*embed_tokens.weight.*tied"):
        editor.prepare_for_editing()
    assert torch.equal(model.lm_head.weight, before) and not editor.touched
