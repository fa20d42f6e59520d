"""The evaluation engine without a Trainer: results, references, protocol subsets, reporting."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data.request import EditRequest, PromptAnswer
from lit_edit.evaluation import Evaluation, EvaluationReference, Evaluator, evaluate, report, score_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tokenizer):
    return tokenizer


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_llama(len(tok), seed=1)


def _requests() -> list[EditRequest]:
    return [
        EditRequest(
            prompt="The capital of France is",
            target_new="Rome",
            ground_truth="Paris",
            paraphrase_prompts=("France's capital city is",),
            locality=(PromptAnswer("The capital of Japan is", "Tokyo"),),
            case_id=0,
        ),
        EditRequest(
            prompt="Danielle Darrieux speaks",
            target_new="English",
            ground_truth="French",
            locality=(PromptAnswer("The capital of Italy is", "Rome"),),
            case_id=1,
        ),
    ]


def test_evaluate_returns_figures_and_the_reference_it_built(model, tok):
    result = Evaluator(protocols=["token_accuracy", "generation"], max_new_tokens=3).evaluate(model, tok, _requests())
    assert isinstance(result, Evaluation) and result.seconds >= 0
    ref = result.reference
    assert ref.num_requests == 2
    assert set(ref.locality_argmax) == {("The capital of Japan is", "Tokyo"), ("The capital of Italy is", "Rome")}
    assert set(ref.locality_generations) == {"The capital of Japan is", "The capital of Italy is"}
    # a model is its own reference: full agreement
    assert result.figures["tok_acc/locality"] == 1.0 and result.figures["gen_em/locality_agreement"] == 1.0


def test_given_reference_is_returned_and_used(model, tok):
    evaluator = Evaluator(protocols=["token_accuracy"])
    before = evaluator.evaluate(model, tok, _requests())
    other = make_tiny_llama(len(tok), seed=5)
    after = evaluator.evaluate(other, tok, _requests(), reference=before.reference)
    assert after.reference is before.reference  # compared with, not rebuilt
    assert after.figures["tok_acc/locality"] < 1.0
    # the module form builds the same reference from the unedited model
    assert evaluator.evaluate(other, tok, _requests(), reference=model).figures == after.figures


def test_function_form_matches_the_class(model, tok):
    a = evaluate(model, tok, _requests(), protocols=["probability"])
    b = Evaluator(protocols=["probability"]).evaluate(model, tok, _requests())
    assert a.figures == b.figures


def test_probability_figures_match_a_hand_computation(model, tok):
    reqs = _requests()
    figures = Evaluator(protocols=["probability"]).evaluate(model, tok, reqs).figures
    nll, _ = score_pairs(model, tok, [r.prompt for r in reqs] * 2, [r.target_new for r in reqs] + [r.ground_truth for r in reqs], with_argmax=False)
    p_new, p_true = torch.exp(-nll[:2].double()), torch.exp(-nll[2:].double())
    assert figures["prob/ES"] == pytest.approx(100.0 * float((p_new > p_true).double().mean()))
    assert figures["prob/EM"] == pytest.approx(100.0 * float((p_new - p_true).mean()), rel=1e-5)


def test_protocol_subset_is_a_copy(model, tok):
    evaluator = Evaluator(protocols=["probability", "token_accuracy"])
    only = evaluator.with_protocols(["token_accuracy"])
    assert evaluator.protocols == ("probability", "token_accuracy") and only.protocols == ("token_accuracy",)
    figures = only.evaluate(model, tok, _requests()).figures
    assert figures and all(name.startswith("tok_acc/") for name in figures)
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluator.with_protocols(["bleu"])


def test_partial_evaluation_against_a_larger_reference(model, tok):
    evaluator = Evaluator(protocols=["token_accuracy"])
    ref = evaluator.evaluate(model, tok, _requests()).reference
    with pytest.raises(ValueError, match="covers 2 requests"):
        evaluator.evaluate(model, tok, _requests()[:1], reference=ref)
    one = evaluator.evaluate(model, tok, _requests()[:1], reference=ref, partial=True)
    assert one.figures["tok_acc/locality"] == 1.0


def test_rank_shares_cover_every_request(model, tok):
    evaluator = Evaluator(protocols=["token_accuracy"])
    full = evaluator.evaluate(model, tok, _requests()).figures
    shares = [evaluator.evaluate(model, tok, _requests(), rank=r, world_size=2).figures for r in (0, 1)]
    # each request alone: the mean of the two shares is the full mean (one request per share)
    assert full["tok_acc/reliability"] == pytest.approx(sum(s["tok_acc/reliability"] for s in shares) / 2)


def test_reference_state_round_trip(model, tok):
    ref = Evaluator(protocols=["token_accuracy", "generation"], max_new_tokens=2).evaluate(model, tok, _requests()).reference
    back = EvaluationReference.from_state_dict(ref.state_dict())
    assert back.num_requests == ref.num_requests and back.locality_generations == ref.locality_generations
    assert all(torch.equal(back.locality_argmax[k], v) for k, v in ref.locality_argmax.items())


def test_report_on_hand_values(tmp_path):
    before, after = {"prob/ES": 40.0, "ppl/wiki": 10.0}, {"prob/ES": 90.0, "ppl/wiki": 11.0, "prob/PS": 50.0}
    flat = report.flat_metrics(before, after)
    assert flat["prob/ES/delta"] == 50.0 and flat["ppl/wiki/delta"] == 1.0 and "prob/PS/before" not in flat
    text = report.table(before, after, "header")
    assert text.splitlines()[0] == "header" and "+50.0000" in text and "prob/PS" in text
    record = report.summary(before, after, protocols={"probability": "p", "perplexity": "q"}, timing="after-all", num_requests=3)
    assert record["figures"]["prob/ES"]["delta"] == 50.0 and record["figures"]["ppl/wiki"]["protocol"] == "perplexity"
    assert record["figures"]["prob/PS"]["before"] is None and record["num_requests"] == 3
    path = report.write_summary(tmp_path, record)
    assert json.loads(path.read_text())["after"]["prob/PS"] == 50.0
