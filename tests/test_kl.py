"""The ``kl`` protocol: KL(P_unedited ‖ P_edited) of next-token distributions on held-out text."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lit_edit.evaluation import EvaluationReference, Evaluator, UneditedCache
from lit_edit.evaluation.divergence import TopKDistribution, decode_tensor, encode_tensor
from lit_edit.evaluation.protocols import figure_description, protocol_of

TEXTS = [
    "The river flows through the old town and past the cathedral before it reaches the sea.",
    "In 1905 the physicist published four papers that changed how people thought about light.",
    "Bread is made from flour, water, salt and yeast, and baked in a hot oven.",
]
MAX_LENGTH = 16


def _evaluator(top_k: int, **kw) -> Evaluator:
    return Evaluator(protocols=["kl"], ppl_corpus=TEXTS, kl_texts=len(TEXTS), kl_top_k=top_k, ppl_max_length=MAX_LENGTH,
                     batch_size=2, **kw)


def _logprobs(model, tokenizer) -> list[torch.Tensor]:
    """Each text's (positions, vocabulary) next-token log-probabilities, one text per forward."""
    out = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_LENGTH]])
            out.append(torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1))
    return out


def _perturb(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w.add_(2.0 * torch.randn(w.shape, generator=g) * w.abs().mean())


@pytest.fixture
def sharp_llama(tiny_llama):
    """The tiny random model with peaked next-token distributions (a random model's are nearly
    uniform over the 49k tokens, where a top-k summary would hold almost nothing)."""
    with torch.no_grad():
        tiny_llama.model.norm.weight.fill_(8.0)
    return tiny_llama


@pytest.fixture
def edited(sharp_llama, one_thread):
    """(unedited copy, edited model): one MLP weight of the tiny model changed."""
    tiny_llama = sharp_llama
    unedited = copy.deepcopy(tiny_llama)
    _perturb(tiny_llama)
    return unedited, tiny_llama


def test_full_vocabulary_kl_equals_hand_computation(edited, tokenizer):
    unedited, model = edited
    ev = _evaluator(top_k=10**6)  # more than the vocabulary: nothing in the tail
    before = ev.evaluate(unedited, tokenizer, [])
    assert before.figures == {"kl/texts": 0.0, "kl/texts/p95": 0.0}
    assert all(d.k == model.config.vocab_size and torch.isinf(d.tail).all() for d in before.reference.kl.values())
    after = ev.evaluate(model, tokenizer, [], reference=before.reference).figures

    per_token = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(_logprobs(unedited, tokenizer), _logprobs(model, tokenizer))])
    assert per_token.numel() == 3 * (MAX_LENGTH - 1)
    assert after["kl/texts"] > 1e-3  # the change is visible
    assert after["kl/texts"] == pytest.approx(per_token.mean().item(), rel=1e-4)
    assert after["kl/texts/p95"] == pytest.approx(torch.quantile(per_token, 0.95).item(), rel=1e-4)


def test_unedited_model_scores_zero(tiny_llama, tokenizer, one_thread):
    ev = _evaluator(top_k=8)
    before = ev.evaluate(tiny_llama, tokenizer, [])
    again = ev.evaluate(tiny_llama, tokenizer, [], reference=before.reference).figures
    assert again == {"kl/texts": 0.0, "kl/texts/p95": 0.0}
    # the unedited model given as the reference builds the same top-k distributions
    ref = ev.make_reference(tiny_llama, tokenizer, [])
    assert sorted(ref.kl) == [0, 1, 2]
    for i, d in ref.kl.items():
        assert torch.equal(d.ids, before.reference.kl[i].ids) and torch.equal(d.logprobs, before.reference.kl[i].logprobs)


def test_truncated_kl_is_the_partition_kl_and_a_lower_bound(edited, tokenizer):
    unedited, model = edited
    k = 5
    truncated = _evaluator(top_k=k)
    full = _evaluator(top_k=10**6)
    value = truncated.evaluate(model, tokenizer, [], reference=truncated.evaluate(unedited, tokenizer, []).reference).figures
    exact = full.evaluate(model, tokenizer, [], reference=full.evaluate(unedited, tokenizer, []).reference).figures

    by_hand = []
    for p, q in zip(_logprobs(unedited, tokenizer), _logprobs(model, tokenizer)):
        top = torch.topk(p, k, dim=-1).indices
        ps, qs = p.gather(-1, top).exp(), q.gather(-1, top).exp()
        p_tail, q_tail = 1 - ps.sum(-1), 1 - qs.sum(-1)
        by_hand.append((ps * (ps / qs).log()).sum(-1) + p_tail * (p_tail / q_tail).log())
    by_hand = torch.cat(by_hand)
    assert value["kl/texts"] == pytest.approx(by_hand.mean().item(), rel=1e-4)
    assert value["kl/texts"] < exact["kl/texts"]
    assert (by_hand <= torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(
        _logprobs(unedited, tokenizer), _logprobs(model, tokenizer))]) + 1e-9).all()


def test_reference_round_trips_through_the_disk_cache(edited, tokenizer, tmp_path):
    unedited, model = edited
    ev = _evaluator(top_k=7)
    cache = UneditedCache(tmp_path)
    first = UneditedCache.evaluate(cache, ev, unedited, tokenizer, [])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["key"]["kl"] == {"texts": 3, "top_k": 7, "max_length": MAX_LENGTH}
    assert "top-7 tokens" in stored["key"]["protocols"]["kl"]

    second = UneditedCache.evaluate(cache, ev, unedited, tokenizer, [])
    assert second.seconds == 0.0  # read, not evaluated
    assert sorted(second.reference.kl) == sorted(first.reference.kl) == [0, 1, 2]
    for i, d in first.reference.kl.items():
        back = second.reference.kl[i]
        assert torch.equal(back.ids, d.ids) and torch.equal(back.logprobs, d.logprobs) and torch.equal(back.tail, d.tail)
    fresh = ev.evaluate(model, tokenizer, [], reference=first.reference).figures
    cached = ev.evaluate(model, tokenizer, [], reference=second.reference).figures
    assert fresh == cached and fresh["kl/texts"] > 0

    # another k is another cache entry
    UneditedCache.evaluate(cache, _evaluator(top_k=8), unedited, tokenizer, [])
    assert len(list(tmp_path.glob("*.json"))) == 2

    # the checkpoint form (EditEvaluation.state_dict) keeps the distributions too
    restored = EvaluationReference.from_state_dict(first.reference.state_dict())
    assert torch.equal(restored.kl[2].logprobs, first.reference.kl[2].logprobs)


def test_reference_with_other_settings_is_refused(edited, tokenizer):
    unedited, model = edited
    ref = _evaluator(top_k=4).evaluate(unedited, tokenizer, []).reference
    with pytest.raises(ValueError, match="kl_top_k"):
        _evaluator(top_k=6).evaluate(model, tokenizer, [], reference=ref)
    no_kl = Evaluator(protocols=["perplexity"], ppl_corpus=TEXTS).evaluate(unedited, tokenizer, []).reference
    with pytest.raises(ValueError, match="no kl output"):
        _evaluator(top_k=4).evaluate(model, tokenizer, [], reference=no_kl)
    with pytest.raises(ValueError, match="ppl_max_length"):
        _evaluator(top_k=4).__class__(protocols=["kl"], ppl_corpus=TEXTS, kl_texts=3, kl_top_k=4,
                                      ppl_max_length=MAX_LENGTH - 3).evaluate(model, tokenizer, [], reference=ref)


@pytest.mark.parametrize(("option", "value", "error"), [
    ("kl_top_k", 0, ValueError), ("kl_texts", 0, ValueError), ("kl_top_k", -3, ValueError), ("kl_texts", 2.5, TypeError),
])
def test_bad_options_name_the_option(option, value, error):
    with pytest.raises(error, match=option):
        Evaluator(protocols=["kl"], **{option: value})


def test_figures_and_storage_helpers():
    assert protocol_of("kl/wiki") == "kl" and protocol_of("kl/wiki/p95") == "kl"
    assert "95th percentile" in figure_description("kl/wiki/p95") and "mean" in figure_description("kl/wiki")
    assert "kl" in Evaluator(protocols=["kl", "probability"]).descriptions()
    assert not Evaluator(protocols=["kl"]).needs_requests
    t = torch.tensor([[1.5, float("-inf")], [0.25, -2.0]])
    assert torch.equal(decode_tensor(encode_tensor(t)), t)
    with pytest.raises(ValueError, match="shape"):
        TopKDistribution.from_state_dict({"ids": encode_tensor(torch.zeros(2, 3, dtype=torch.int32)),
                                          "logprobs": encode_tensor(torch.zeros(2, 2)), "tail": encode_tensor(torch.zeros(2))})


@pytest.mark.parametrize(("timing", "accumulate"), [("after-all", True), ("immediate", True), ("immediate", False)])
def test_edit_evaluation_callback_reports_kl(sharp_llama, tokenizer, requests, tmp_path, one_thread, timing, accumulate):
    """In a fit: 0 before; after sequential edits > 0 (also under immediate timing, where KL is
    measured once on the final model against the unedited reference); with single edits
    (restored after each) the final model is the unedited one again: exactly 0."""
    import lightning as L

    from lit_edit.data import EditDataModule
    from lit_edit.editors import DepthFirstFT
    from lit_edit.evaluation import EditEvaluation

    ev = EditEvaluation(protocols=["probability", "kl"], ppl_corpus=TEXTS, kl_texts=2, kl_top_k=16, ppl_max_length=MAX_LENGTH,
                        timing=timing, print_table=False, summary_dir=str(tmp_path), cache_unedited=False)
    ed = DepthFirstFT(model=sharp_llama, tokenizer=tokenizer, target_modules=["mlp.down_proj"], layers_to_transform=[1],
                      lr=5e-3, steps=10, accumulate=accumulate)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=1, callbacks=[ev])
    trainer.fit(ed, datamodule=EditDataModule(requests=list(requests), batch_size=1, shuffle=False))
    assert ev.before["kl/texts"] == 0.0
    if accumulate:
        assert ev.after["kl/texts"] > 0 and ev.after["kl/texts/p95"] >= ev.after["kl/texts"] * 0.5
    else:
        assert ev.after["kl/texts"] == 0.0 and ev.after["prob/ES"] > ev.before["prob/ES"]
    summary = ev.summary()
    assert summary["figures"]["kl/texts"]["protocol"] == "kl" and "top-16 tokens" in summary["protocols"]["kl"]
