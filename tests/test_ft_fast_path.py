"""The fine-tuning editors' fast path (block-input cache, length groups): same losses, gradients and
weights as one padded batch through the whole model."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data import EditDataModule, EditRequest
from lit_edit.editors import DepthFirstFT, LocFTBF
from lit_edit.losses import BlockInputCache, ft_loss, length_groups

TUNED = "model.layers.2.mlp.down_proj.weight"


def _requests() -> list[EditRequest]:
    facts = [
        ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"),
        ("Toko Yasuda, the", "Toko Yasuda", "piano player"),
        ("Autonomous University of Madrid, which is located in", "Autonomous University of Madrid", "Sweden"),
        ("The capital city of Norway is", "Norway", "Bergen"),
        ("Apple A5 was created by", "Apple A5", "Google"),
    ]
    return [EditRequest(prompt=p, subject=s, target_new=t, case_id=i) for i, (p, s, t) in enumerate(facts)]


class _Record(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _fit(tokenizer, cls=LocFTBF, epochs=6, batch_size=2, **kw):
    model = make_tiny_llama(len(tokenizer), layers=4)
    block0 = []
    model.model.layers[0].register_forward_hook(lambda *a: block0.append(1))
    kw.setdefault("target_modules", ["mlp.down_proj"])
    kw.setdefault("layers_to_transform", [2])
    editor = cls(model=model, tokenizer=tokenizer, lr=1e-2, min_loss=0.0, **kw)
    record = _Record()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record],
    )
    data = EditDataModule(requests=_requests(), batch_size=batch_size, shuffle=True, seed=3)
    trainer.fit(editor, datamodule=data)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return record.losses, weights, len(block0), editor


@pytest.mark.parametrize("loss", ["ft_m", "ft_l"])
def test_locft_bf_from_cached_block_inputs_matches_the_full_model(tokenizer, loss):
    fast, w_fast, block0_fast, editor = _fit(tokenizer, loss=loss)
    full, w_full, block0_full, _ = _fit(tokenizer, loss=loss, cache_block_inputs=False, group_by_length=False)
    assert len(fast) == len(full) == 18  # 6 epochs x 3 mini-batches of 2
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(full), rtol=1e-5, atol=1e-5)
    assert full[-1] < full[0] - 0.5  # the trajectory is a real descent, not a constant
    for name in w_full:
        torch.testing.assert_close(w_fast[name], w_full[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(w_full[TUNED], make_tiny_llama(len(tokenizer), layers=4).state_dict()[TUNED])
    # the lowest block runs for the first epoch only (3 mini-batches) instead of every step
    assert block0_full == 18 and block0_fast == 3
    assert editor.block_inputs is None  # dropped when the fit ends


def test_depth_first_ft_from_cached_block_inputs_matches_the_full_model(tokenizer):
    fast, w_fast, block0_fast, _ = _fit(tokenizer, cls=DepthFirstFT, epochs=1, batch_size=3, steps=5)
    full, w_full, block0_full, _ = _fit(tokenizer, cls=DepthFirstFT, epochs=1, batch_size=3, steps=5, cache_block_inputs=False,
                                       group_by_length=False)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(full), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_fast[TUNED], w_full[TUNED], rtol=1e-5, atol=1e-6)
    assert block0_full == 10 and block0_fast == 2  # 2 batches x 5 steps, against the first step of each


def test_cache_is_off_where_it_would_not_be_exact(tokenizer):
    def layer_of(untied=False, **kw):
        model = make_tiny_llama(len(tokenizer), layers=4, tie_word_embeddings=not untied)
        editor = LocFTBF(model=model, tokenizer=tokenizer, **kw)
        editor.prepare_for_editing()
        return editor.block_input_layer()

    assert layer_of(target_modules=["mlp.down_proj"], layers_to_transform=[2]) == (2, "")
    assert layer_of(target_modules=["mlp.down_proj", "self_attn.o_proj"], layers_to_transform=[3, 1]) == (1, "")
    assert layer_of(target_modules=["mlp.down_proj"], layers_to_transform=[2], lora_rank=2) == (2, "")
    off = [
        layer_of(target_modules=["mlp.down_proj"], layers_to_transform=[2], cache_block_inputs=False),
        layer_of(target_modules=["mlp.down_proj"], layers_to_transform=[0]),
        layer_of(target_modules=["mlp.down_proj"], layers_to_transform=[0, 2], lora_rank=2),
        layer_of(untied=True, target_modules=r"model\.(embed_tokens|layers\.2\.mlp\.down_proj)"),
    ]
    assert [layer for layer, _ in off] == [None] * 4
    assert "cache_block_inputs=False" in off[0][1] and "block 0" in off[1][1] and "embed_tokens" in off[3][1]
    editor = LocFTBF(model=make_tiny_llama(len(tokenizer), layers=4, attention_dropout=0.1), tokenizer=tokenizer,
                     target_modules=["mlp.down_proj"], layers_to_transform=[2])
    editor.prepare_for_editing()
    assert editor.block_input_layer()[0] is None and "dropout" in editor.block_input_layer()[1]


def test_cache_refuses_a_bad_option_and_layer(tokenizer):
    with pytest.raises(TypeError, match="cache_block_inputs"):
        LocFTBF(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, cache_block_inputs="yes")
    with pytest.raises(ValueError, match="layer"):
        BlockInputCache(make_tiny_llama(len(tokenizer)).model.layers, 0)


def test_cached_rows_do_not_depend_on_their_batch(tokenizer):
    """States recorded in one batch serve a request in another batch of a different padded length."""
    model = make_tiny_llama(len(tokenizer), layers=3)
    reqs = _requests()
    cache = BlockInputCache(model.model.layers, 2)
    with torch.no_grad():
        ft_loss(model, tokenizer, reqs, block_inputs=cache)  # fills the cache
        assert len(cache) == len(reqs) and cache.misses == 1 and cache.nbytes > 0
        for batch in ([reqs[4], reqs[0]], [reqs[2]], reqs[::-1]):
            torch.testing.assert_close(ft_loss(model, tokenizer, batch, block_inputs=cache), ft_loss(model, tokenizer, batch),
                                       rtol=1e-5, atol=1e-6)
    assert cache.hits == 3 and cache.misses == 1
    assert all(type(b).__name__ != "_Skip" for b in model.model.layers)  # the blocks are put back


def test_length_groups_partition_the_rows_at_the_least_cost():
    """The dynamic programme's split is a partition of the rows and costs no more than any split
    of the length-sorted rows into contiguous groups (brute force)."""

    def cost(groups, lengths, overhead):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    for lengths in ([5, 5, 5], [3], [6, 18, 7, 7, 12, 6, 30, 11], [2, 40, 2, 40, 2, 40], list(range(1, 11))):
        for overhead in (0, 4, 32):
            groups = length_groups(lengths, overhead=overhead)
            assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
            order = sorted(range(len(lengths)), key=lambda i: lengths[i])
            best = min(
                cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
                for k in range(len(order))
                for cuts in itertools.combinations(range(1, len(order)), k)
            )
            assert cost(groups, lengths, overhead) == best
    assert length_groups([5, 5, 5]) == [[0, 1, 2]]
    assert len(length_groups([2, 40, 2, 40, 2, 40], overhead=4)) == 2


def test_length_groups_give_the_padded_batch_losses_and_gradient(tokenizer):
    """Requests of very different lengths: the grouped batch runs as several sub-batches and
    gives the padded batch's per-request losses and gradient of their mean."""
    model = make_tiny_llama(len(tokenizer), layers=3)
    long = "In a long and winding description that goes on for many words about places and people, " * 3
    reqs = _requests() + [EditRequest(prompt=long + p, subject=s, target_new=t, case_id=10 + i)
                          for i, (p, s, t) in enumerate([("The capital of France is", "France", "Lyon"),
                                                         ("Apple A5 was made by", "Apple A5", "Intel")])]
    weight = dict(model.named_parameters())[TUNED]
    lengths = [len(tokenizer(r.prompt + " " + r.target_new).input_ids) for r in reqs]
    assert len(length_groups(lengths)) > 1 and max(lengths) > 3 * min(lengths)
    out = {}
    for kind in ("ft_m", "ft_l"):
        for grouped in (False, True):
            model.zero_grad()
            loss = ft_loss(model, tokenizer, reqs, kind, group_by_length=grouped)
            loss.mean().backward()
            out[kind, grouped] = (loss.detach(), weight.grad.clone())
        torch.testing.assert_close(out[kind, True][0], out[kind, False][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[kind, True][1], out[kind, False][1], rtol=1e-4, atol=1e-7)
        assert out[kind, False][1].abs().sum() > 0


def test_group_by_length_is_checked(tokenizer):
    with pytest.raises(TypeError, match="group_by_length"):
        LocFTBF(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, group_by_length=1)
