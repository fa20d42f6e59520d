"""The evaluation fast path (length-sorted teacher forcing with the head at target positions,
cached greedy generation with a token-table stop rule, targets scored and continuations generated
from one pass over each prompt) gives the figures of the plain reference
computation: ``reference_score_pairs`` / ``reference_greedy_generate`` (batches in the given
order, full logits, ``model.generate`` with a stopping criterion that decodes every step)."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from helpers import make_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_edit.evaluation import Evaluator
from lit_edit.evaluation import evaluator as evaluator_module
from lit_edit.evaluation.scoring import (
    StopOnStrings,
    can_still_match,
    greedy_generate,
    normalize_answer,
    reference_greedy_generate,
    reference_score_pairs,
    score_and_generate,
    score_pairs,
    stop_token_table,
    with_progress,
)

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Apple was founded by",
    "The capital of Japan is",
    "Danielle Darrieux grew up speaking the language of her home country, which is",
    "x",
    "The mother tongue of Danielle Darrieux is",
    "Where is the Eiffel Tower? It stands in",
]
TARGETS = ["Rome", "Bill Gates", "Tokyo", "French, of course", "y", "Hüttenwerk-Oberhausen.com", "the 7th arrondissement"]


@pytest.fixture
def model(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=3)


def test_score_pairs_matches_the_reference(model, tokenizer):
    """Multi-token targets, prompts of very different lengths, batches that cut the sorted order."""
    prompts, targets = PROMPTS * 3, TARGETS[1:] + TARGETS * 2 + TARGETS[:1]
    assert any(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) > 3 for t in targets)
    for batch_size in (1, 3, 16):
        nll, tokens = score_pairs(model, tokenizer, prompts, targets, batch_size)
        ref_nll, ref_tokens = reference_score_pairs(model, tokenizer, prompts, targets, batch_size)
        assert nll.shape == ref_nll.shape == (len(prompts),)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-6)
        assert len(tokens) == len(ref_tokens)
        for (pred, gold), (ref_pred, ref_gold) in zip(tokens, ref_tokens):
            assert torch.equal(gold, ref_gold) and torch.equal(pred, ref_pred)


def test_score_pairs_without_a_known_head_uses_full_logits(model, tokenizer, monkeypatch):
    from lit_edit.evaluation import scoring

    monkeypatch.setattr(scoring, "_head_module", lambda m: None)
    nll, tokens = score_pairs(model, tokenizer, PROMPTS, TARGETS, 4)
    ref_nll, ref_tokens = reference_score_pairs(model, tokenizer, PROMPTS, TARGETS, 4)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(tokens, ref_tokens))
    assert score_pairs(model, tokenizer, [], []) [0].numel() == 0


def _step_of_first_stop(tokenizer, ids, stops):
    """The old rule: the first step after which the decoded new text holds a stop string."""
    for step in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:step], skip_special_tokens=True)
        if any(s in text for s in stops):
            return step
    return None


def test_stop_table_flags_the_step_the_decoding_rule_stops_at(tokenizer):
    table = stop_token_table(tokenizer)
    assert table is not None and table.dtype == torch.bool and len(table) >= len(tokenizer)
    dot_inside = [i for i in range(len(tokenizer)) if "." in tokenizer.decode([i])[1:-1]]
    assert dot_inside and all(table[i] for i in dot_inside)  # a stop character in the middle of a token
    assert not table[tokenizer.eos_token_id]  # EOS stops through the EOS ids, not the text
    rng = random.Random(0)
    flagged = table.nonzero().flatten().tolist()
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(6)]
        if rng.random() < 0.5:
            ids[rng.randrange(6)] = rng.choice(flagged + dot_inside)
        first = next((k + 1 for k, i in enumerate(ids) if table[i]), None)
        assert first == _step_of_first_stop(tokenizer, ids, (".", "\n"))
        # the old criterion, applied as a batch at that step, agrees
        width = 2
        batch = torch.tensor([[0] * width + ids])
        if first is not None:
            assert bool(StopOnStrings(tokenizer, width)(batch[:, : width + first])[0])
    assert stop_token_table(tokenizer, ("\n\n",)) is None  # a multi-character stop string: decoded each step


def _generations_agree(model, tokenizer, prompts, **kwargs):
    fast = greedy_generate(model, tokenizer, prompts, **kwargs)
    ref = reference_greedy_generate(model, tokenizer, prompts, **kwargs)
    assert fast == ref
    return fast


def test_greedy_generate_matches_the_reference(model, tokenizer):
    for batch_size in (1, 3, 8):
        texts = _generations_agree(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    _generations_agree(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, stop_strings=())  # free running
    _generations_agree(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, stop_strings=(", ", "th"))  # decoded rule
    assert greedy_generate(model, tokenizer, []) == []
    assert any(texts)


def test_greedy_generate_stops_mid_token_and_at_a_first_eos(model, tokenizer):
    free = reference_greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, stop_strings=())
    # a stop character taken from the middle of a token some prompt generates
    pieces = [tokenizer.decode([i]).strip() for text in free for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    middle = next((t[len(t) // 2] for t in pieces if len(t) >= 3 and not t[len(t) // 2].isspace()), None)
    assert middle is not None, free
    texts = _generations_agree(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, stop_strings=(middle,))
    assert all(middle not in t for t in texts)
    # EOS first: the first token a prompt generates declared an end-of-sequence id of the model
    first = model(**tokenizer(PROMPTS[1], return_tensors="pt")).logits[0, -1].argmax().item()
    model.generation_config.eos_token_id = [first]
    texts = _generations_agree(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, stop_strings=(middle,))
    assert texts[1] == tokenizer.decode([first], skip_special_tokens=True).split(middle)[0]  # that one token, cut


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_and_generate_matches_scoring_and_generating_apart(model, tokenizer, batch_size):
    """One pass per prompt: each target's NLL and argmax equal the plain teacher-forced reference
    (prompts of very different lengths, one- and many-token targets, prompts with no target or
    no generation), and each continuation equals the plain generation."""
    targets = [[TARGETS[i], TARGETS[(i + 3) % len(TARGETS)]] for i in range(len(PROMPTS))]
    targets[2], targets[4] = [], [TARGETS[4]]
    generate = [i != 1 for i in range(len(PROMPTS))]
    scores, texts = score_and_generate(model, tokenizer, PROMPTS, targets, generate, max_new_tokens=10, batch_size=batch_size)
    flat = [(p, t) for p, ts in zip(PROMPTS, targets) for t in ts]
    ref_nll, ref_tokens = reference_score_pairs(model, tokenizer, [p for p, _ in flat], [t for _, t in flat])
    got = [s for row in scores for s in row]
    assert len(got) == len(flat) == 11 and [len(row) for row in scores] == [len(t) for t in targets]
    assert any(len(gold) > 3 for _, (_, gold) in got) and any(len(gold) == 1 for _, (_, gold) in got)
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), ref_nll, rtol=1e-5, atol=1e-5)
    for (_, (pred, gold)), (ref_pred, ref_gold) in zip(got, ref_tokens):
        assert torch.equal(gold, ref_gold) and torch.equal(pred, ref_pred)
    ref_texts = reference_greedy_generate(model, tokenizer, [p for p, g in zip(PROMPTS, generate) if g], max_new_tokens=10)
    assert texts[1] is None and [t for t, g in zip(texts, generate) if g] == ref_texts and any(ref_texts)


def test_score_and_generate_stops_decided_rows_with_the_same_exact_match(model, tokenizer):
    """Rows whose only use is an exact match stop once they can match no answer: their exact
    match is the full continuation's; rows without answers run in full."""
    full = reference_greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    answers = [[full[0]], [TARGETS[1]], None, [full[3][:3], "zz"], [TARGETS[4]], None, [full[6] + " more"]]
    _, texts = score_and_generate(model, tokenizer, PROMPTS, [[]] * len(PROMPTS), [True] * len(PROMPTS),
                                  max_new_tokens=12, batch_size=3, answers=answers)
    for text, ref, options in zip(texts, full, answers):
        if options is None:
            assert text == ref
        else:
            assert ref.startswith(text)
            for o in options:
                assert (normalize_answer(text) == normalize_answer(o)) == (normalize_answer(ref) == normalize_answer(o))
    assert texts[0] == full[0] and sum(len(t) < len(f) for t, f in zip(texts, full)) >= 2


def test_score_and_generate_falls_back_for_other_caches(model, tokenizer, monkeypatch):
    """A cache that is not a plain growing one is never extended for scoring: the targets are
    scored by ``score_pairs`` and the continuations are unchanged."""
    from lit_edit.evaluation import scoring

    targets = [[t] for t in TARGETS]
    fast = score_and_generate(model, tokenizer, PROMPTS, targets, [True] * len(PROMPTS), max_new_tokens=6, batch_size=4)
    monkeypatch.setattr(scoring, "_plain_dynamic_cache", lambda cache: False)
    monkeypatch.setattr(scoring, "_score_on_cache", None)  # must not be reached
    slow = score_and_generate(model, tokenizer, PROMPTS, targets, [True] * len(PROMPTS), max_new_tokens=6, batch_size=4)
    assert fast[1] == slow[1]
    for a, b in zip(fast[0], slow[0]):
        assert a[0][0] == pytest.approx(b[0][0], rel=1e-5) and torch.equal(a[0][1][0], b[0][1][0])
    with pytest.raises(ValueError, match="target lists"):
        score_and_generate(model, tokenizer, PROMPTS, targets[:2], [True] * len(PROMPTS))


def test_can_still_match_by_hand():
    paris = [normalize_answer("Paris").split()]
    assert can_still_match("", paris) and can_still_match(" Pa", paris) and can_still_match(" The Par", paris)
    assert can_still_match(" th", paris)  # may become the article "the", which is dropped
    assert can_still_match(" London", [["london", "city"], ["paris"]])  # a prefix of the first answer
    assert not can_still_match(" Paris, France", paris)  # a final word after the answer
    assert not can_still_match(" Lo", paris) and not can_still_match(" Paris is ", paris)
    assert can_still_match(" Paris", paris) and can_still_match(" PARIS ", paris)
    assert can_still_match(" Paris\u2019", paris)  # a non-ASCII mark: unsure, so True


_PIECES = ["a", "an", "the", "Paris", "par", "is", "x", " ", " ", ",", ".", "-", "'", "The", "A", "isx"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=6), st.lists(st.sampled_from(_PIECES), max_size=6),
       st.sampled_from(["Paris", "the Paris", "Paris is", "a", "x Paris", "Par-is"]))
def test_can_still_match_never_rules_out_a_continuation_that_matches(prefix, rest, answer):
    """If a continuation of the text matches the answer, the text was not ruled out."""
    text, full = "".join(prefix), "".join(prefix + rest)
    if normalize_answer(full) == normalize_answer(answer):
        assert can_still_match(text, [normalize_answer(answer).split()])


def test_evaluator_figures_match_the_reference_functions(model, tokenizer, requests, monkeypatch):
    evaluator = Evaluator(batch_size=2, max_new_tokens=8, ppl_corpus=PROMPTS * 2, ppl_texts=10)
    fast = evaluator.evaluate(model, tokenizer, requests)
    assert evaluator.shares_prompts  # the fast run scored and generated from one pass per prompt
    monkeypatch.setattr(Evaluator, "shares_prompts", property(lambda self: False))
    monkeypatch.setattr(evaluator_module, "score_pairs", reference_score_pairs)
    monkeypatch.setattr(evaluator_module, "greedy_generate", reference_greedy_generate)
    monkeypatch.setattr(evaluator_module, "score_and_generate", None)  # the reference never calls it
    ref = evaluator.evaluate(model, tokenizer, requests)
    assert fast.figures.keys() == ref.figures.keys() and len(fast.figures) >= 10
    # rel: float rounding. abs: margins such as prob/EM are differences of two float32 NLLs of
    # about 10 nats and may be near 0 (1e-4 here), so they agree to a fraction of a float32 ulp
    # of those NLLs (1e-6), not to a relative 1e-6 of their own size; CPUs with other vector units
    # differ there by about 1e-9.
    for name, value in ref.figures.items():
        assert fast.figures[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert fast.reference.locality_generations == ref.reference.locality_generations
    assert all(torch.equal(fast.reference.locality_argmax[k], v) for k, v in ref.reference.locality_argmax.items())


def test_progress_logs_lines_when_not_a_terminal(caplog, monkeypatch):
    from lit_edit import progress

    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="lit_edit.evaluation.scoring"):
        assert list(with_progress(range(5), total=5, desc="scoring things", every=0.0)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring things")]
    assert len(lines) >= 5 and "5/5" in lines[-1] and "(done)" in lines[-1]
