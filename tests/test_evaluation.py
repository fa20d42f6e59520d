"""Evaluation: scoring primitives, metrics on hand-computed values, the corpus, the callback."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data.corpus import corpus_name, corpus_version, load_texts, wiki_texts
from lit_edit.data.request import EditRequest, PromptAnswer
from lit_edit.data.tokenize import encode_pairs, target_nll
from lit_edit.evaluation import (
    EditEvaluation,
    Evaluator,
    ExactMatch,
    Perplexity,
    ProbabilityComparison,
    TokenAccuracy,
    continuation_nll,
    greedy_generate,
    ngram_entropy,
    normalize_answer,
    perplexity,
    teacher_forced_argmax,
    truncate_at_stop,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The embedded model's tokenizer (conftest converts the model once if needed)."""
    return tokenizer


def tiny_llama(tok, seed: int = 0):
    """A tiny random Llama that stops at (and pads with) the tokenizer's EOS."""
    ids = {"bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    return make_tiny_llama(len(tok), seed=seed, max_position_embeddings=512, **ids)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def requests():
    return [
        EditRequest(
            prompt="The capital of France is",
            subject="France",
            target_new="Rome",
            ground_truth="Paris",
            paraphrase_prompts=("France has its capital in",),
            locality=(PromptAnswer("The capital of Germany is", "Berlin"),),
            portability=(PromptAnswer("The Eiffel Tower stands in", "Rome"),),
        ),
        EditRequest(
            prompt="Danielle Darrieux speaks",
            subject="Danielle Darrieux",
            target_new="English",
            locality=(PromptAnswer("Angela Merkel speaks", "German"),),
        ),
    ]


# --------------------------------------------------------------------------- text helpers


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  Paris.  ", "paris"),
        ("an Apple a day", "apple day"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("New\tYork,   City!", "new york city"),
        ("A", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_truncate_at_stop():
    assert truncate_at_stop(" Paris. It is") == " Paris"
    assert truncate_at_stop(" Rome is\nnice. ok") == " Rome is"
    assert truncate_at_stop(" no stop") == " no stop"
    assert truncate_at_stop("a.b", ()) == "a.b"


def test_ngram_entropy_hand_computed():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2 * 100)
    assert ngram_entropy("a b a b", scale=1.0) == pytest.approx((2 / 3 * h2 + 4 / 3) / 2)
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("") == 0.0


# --------------------------------------------------------------------------- metrics


def test_exact_match_metric():
    em = ExactMatch()
    em.update([" Paris", "The Rome", "london bridge"], ["paris", "Rome.", "London"])
    assert em.compute().item() == pytest.approx(2 / 3)
    em.update(["Big Apple"], [["New York", "the big apple"]])  # any of several references
    assert em.compute().item() == pytest.approx(3 / 4)


def test_probability_comparison_hand_computed():
    m = ProbabilityComparison()
    m.update(torch.tensor([0.1]), torch.tensor([1.0]), "edit")  # accumulates across calls
    m.update([2.0], [0.5], "edit")
    m.update([0.2], [0.3], "paraphrase")
    # neighborhood: nll_new scores target_new, nll_true the locality answer
    m.update([0.5, 0.1, 3.0], [1.0, 2.0, 0.2], "neighborhood")
    out = {k: v.item() for k, v in m.compute().items()}
    e = math.exp
    assert out["ES"] == pytest.approx(50.0)
    assert out["EM"] == pytest.approx(100 * ((e(-0.1) - e(-1.0)) + (e(-2.0) - e(-0.5))) / 2)
    assert out["PS"] == pytest.approx(100.0)
    assert out["PM"] == pytest.approx(100 * (e(-0.2) - e(-0.3)))
    assert out["NS"] == pytest.approx(100 / 3)
    assert out["NM"] == pytest.approx(100 * ((e(-1.0) - e(-0.5)) + (e(-2.0) - e(-0.1)) + (e(-0.2) - e(-3.0))) / 3)
    assert out["S"] == pytest.approx(3 / (1 / 50 + 1 / 100 + 3 / 100))
    m.reset()
    m.update([1.0], [0.5], "neighborhood")  # only NS: ES/PS are left out, S = NS
    out = {k: v.item() for k, v in m.compute().items()}
    assert set(out) == {"NS", "NM", "S"} and out["S"] == out["NS"] == 100.0
    with pytest.raises(ValueError, match="unknown kind"):
        m.update([1.0], [1.0], "other")


def test_token_accuracy_and_perplexity_metrics():
    acc = TokenAccuracy()
    acc.update(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
    acc.update([torch.tensor([5])], [torch.tensor([5])])
    assert acc.compute().item() == pytest.approx((2 / 3 + 1) / 2)
    pooled = TokenAccuracy(average="token")
    pooled.update([torch.tensor([1, 2, 3]), torch.tensor([5])], [torch.tensor([1, 2, 4]), torch.tensor([5])])
    assert pooled.compute().item() == pytest.approx(3 / 4)
    ppl = Perplexity()
    ppl.update(3.0, 2)
    ppl.update(torch.tensor(1.0), torch.tensor(2))
    assert ppl.compute().item() == pytest.approx(math.e)


# --------------------------------------------------------------------------- scoring on a model


def test_continuation_nll_and_argmax_match_manual(model, tok):
    prompts = ["The capital of France is", "Hi"]
    targets = ["Paris", "there my old friend"]
    nll = continuation_nll(model, tok, prompts, targets, batch_size=2)
    pairs = teacher_forced_argmax(model, tok, prompts, targets, batch_size=2)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        p_ids = tok(prompt)["input_ids"]
        t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        positions = range(len(p_ids) - 1, len(p_ids) + len(t_ids) - 1)
        manual = -sum(logp[pos, tok_id] for pos, tok_id in zip(positions, t_ids)) / len(t_ids)
        assert nll[i].item() == pytest.approx(manual.item(), rel=1e-5)
        argmax, target_ids = pairs[i]
        assert target_ids.tolist() == t_ids
        assert argmax.tolist() == [int(logp[pos].argmax()) for pos in positions]
    # the same scores with one pair per batch (padding does not leak in)
    assert torch.allclose(continuation_nll(model, tok, prompts, targets, batch_size=1), nll, atol=1e-5)
    # and the same as the training loss's own helper
    batch = encode_pairs(tok, prompts[:1], targets[:1])
    with torch.no_grad():
        assert target_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0].item() == pytest.approx(nll[0].item(), rel=1e-5)


def test_perplexity_matches_manual(model, tok):
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world", "A"]
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        total += -sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))
        count += len(ids) - 1
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, tok, texts, max_batch_tokens=8) == pytest.approx(math.exp(total / count), rel=1e-5)
    # truncation to max_length tokens
    ids = tok(texts[0])["input_ids"][:4]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    manual = math.exp(-sum(logp[t - 1, ids[t]].item() for t in range(1, 4)) / 3)
    assert perplexity(model, tok, texts[:1], max_length=4) == pytest.approx(manual, rel=1e-5)


def test_greedy_generate_stops_at_period_and_newline(tok):
    model = tiny_llama(tok, seed=1)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = enc(" x") * 12
    scripts = [enc(" Paris") + enc(".") + filler, enc(" Rome is nice") + enc("\n") + filler]
    calls = []
    rows: list[int] = []  # the script of each row of the running batch (rows may be reordered or leave)
    italy = enc("Italy")[-1]

    def track_rows(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # the prompts: a row's script follows from its prompt
            rows[:] = [1 if row[-1] == italy else 0 for row in ids.tolist()]
        elif ids.shape[0] < len(rows):  # finished rows left the batch: keep those whose last token is theirs
            step, kept, tokens = len(calls) - 1, [], ids[:, 0].tolist()
            for k in rows:
                if len(kept) < len(tokens) and scripts[k][step] == tokens[len(kept)]:
                    kept.append(k)
            rows[:] = kept

    def scripted_logits(module, inputs, output):
        step = len(calls)
        calls.append(step)
        forced = torch.full_like(output, -1e4)
        for row, k in enumerate(rows):
            forced[row, -1, scripts[k][step]] = 0.0
        return forced

    pre = model.register_forward_pre_hook(track_rows, with_kwargs=True)
    handle = model.lm_head.register_forward_hook(scripted_logits)
    try:
        out = greedy_generate(model, tok, ["The capital of France is", "Italy"], max_new_tokens=10, batch_size=2)
        steps_to_stop = len(enc(" Rome is nice")) + 1  # the later row stops after its newline
        assert out == [" Paris", " Rome is nice"]
        assert len(calls) == steps_to_stop
        calls.clear()
        free = greedy_generate(model, tok, ["The capital of France is", "Italy"], max_new_tokens=6, batch_size=2, stop_strings=())
        assert len(calls) == 6 and free[0].startswith(" Paris. x")
    finally:
        handle.remove()
        pre.remove()


def test_greedy_generate_left_padding_is_consistent(model, tok):
    prompts = ["The capital of France is", "Hi", "Michael Jordan plays the sport of"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all("." not in t and "\n" not in t for t in batched)


# --------------------------------------------------------------------------- corpus


def test_wiki_texts_real_corpus():
    try:
        heldout = wiki_texts("heldout")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    train = wiki_texts("train")
    assert len(heldout) == 1004 and len(train) == 9029  # every 10th of 10,033 sorted keys
    assert not set(heldout) & set(train)
    assert all(t.strip() for t in heldout[:50] + train[:50])
    assert wiki_texts("heldout", limit=5) == heldout[:5]  # deterministic
    assert load_texts("wiki:train", limit=3) == train[:3]
    assert load_texts("wiki", split="train", limit=2) == train[:2]
    assert corpus_version("wiki").endswith(":heldout") and corpus_version("wiki:train").endswith(":train")
    assert corpus_name("wiki:train") == "wiki"
    with pytest.raises(ValueError, match="unknown split"):
        wiki_texts("test")


def test_load_texts_local_sources(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\n\n  second doc  \n")
    assert load_texts(txt) == ["first doc", "second doc"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "one"}\n\n{"body": "two"}\n{"body": ""}\n')
    assert load_texts(jsonl, text_field="body") == ["one", "two"]
    js = tmp_path / "docs.json"
    js.write_text(json.dumps({"k1": {"extract": "alpha"}, "k2": {"extract": "beta"}}))
    assert load_texts(str(js), text_field="extract", limit=1) == ["alpha"]
    with pytest.raises(KeyError, match="text_field"):
        load_texts(js)
    assert load_texts(["a", " ", "b"]) == ["a", "b"]
    import datasets

    assert load_texts(datasets.Dataset.from_dict({"text": ["x", "y"]})) == ["x", "y"]
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "missing.txt")
    version = corpus_version(txt)
    txt.write_text("first doc\nchanged\nthird\n")
    assert corpus_version(txt) != version and corpus_name(txt) == "docs"
    assert corpus_version(["a"]) != corpus_version(["b"])


# --------------------------------------------------------------------------- callback


def test_callback_rejects_unknown_protocol():
    with pytest.raises(ValueError, match="valid: .*probability.*token_accuracy.*generation.*perplexity.*fluency"):
        EditEvaluation(protocols=["probability", "bleu"])


def test_evaluate_without_trainer(model, tok):
    evaluator = Evaluator(protocols=["probability", "token_accuracy", "generation"], max_new_tokens=4)
    result = evaluator.evaluate(model, tok, requests())
    before = result.figures
    assert before["tok_acc/locality"] == 1.0 and before["gen_em/locality_agreement"] == 1.0
    assert "tok_acc/portability" in before and "gen_em/portability" in before
    assert {"prob/ES", "prob/EM", "prob/PS", "prob/PM", "prob/NS", "prob/NM", "prob/S"} <= set(before)
    # only the first request has a ground truth: ES is a fraction of one request
    assert before["prob/ES"] in (0.0, 100.0)
    other = tiny_llama(tok, seed=3)
    vs_self = evaluator.evaluate(other, tok, requests(), reference=result.reference).figures
    vs_model = evaluator.evaluate(other, tok, requests(), reference=model).figures
    assert vs_self == vs_model
    assert vs_self["tok_acc/locality"] < 1.0  # another random model disagrees with the reference


def _make_module(model, tok, lr=2e-2):
    import lightning as L

    class TinyEditor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = model.train(), tok

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch  # a list of EditRequest: tokenized in training_step

        def training_step(self, batch, batch_idx):
            enc = encode_pairs(self.tokenizer, [r.prompt for r in batch], [r.target_new for r in batch])
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            loss = target_nll(logits, enc["labels"]).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=lr)

    class Requests(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.eval_requests = requests()

        def train_dataloader(self):
            return torch.utils.data.DataLoader([self.eval_requests] * 8, batch_size=None)

    return TinyEditor(), Requests()


def test_callback_in_trainer_writes_summary_and_logs(tok, tmp_path, capsys):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    module, datamodule = _make_module(tiny_llama(tok, seed=2), tok)
    cb = EditEvaluation(
        protocols=["probability", "token_accuracy", "generation", "perplexity", "fluency"],
        max_new_tokens=6,
        ppl_corpus=["The first text is about cities.", "Another text is about languages people speak."],
        batch_size=4,
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[cb],
    )
    trainer.fit(module, datamodule=datamodule)

    summary_path = Path(trainer.log_dir) / "summary.json"
    assert cb.summary_path == summary_path and summary_path.exists()
    summary = json.loads(summary_path.read_text())
    assert summary["evaluation_timing"] == "after-all" and summary["num_requests"] == 2
    assert set(summary["before"]) == set(summary["after"]) == set(summary["figures"])
    em = summary["figures"]["prob/EM"]
    assert em["protocol"] == "probability" and em["after"] > em["before"]  # training raised P(target_new)
    assert summary["figures"]["tok_acc/reliability"]["after"] == 1.0
    assert summary["figures"]["tok_acc/locality"]["before"] == 1.0
    gen = summary["figures"]["gen_em/reliability"]
    assert "≤6 new tokens" in gen["protocol_description"]
    assert "ppl/texts" in summary["figures"] and "fluency/ngram_entropy" in summary["figures"]
    assert not list(Path(trainer.log_dir).glob(".summary.*"))  # no temporary file left behind

    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k.startswith("prob/")}
    assert logged["prob/EM/after"] == pytest.approx(em["after"]) and logged["prob/EM/before"] == pytest.approx(em["before"])
    assert logged["prob/EM/delta"] == pytest.approx(em["after"] - em["before"])

    table = capsys.readouterr().out
    assert "metric" in table and "before" in table and "prob/ES" in table and "tok_acc/locality" in table


def test_callback_request_sources(tmp_path):
    from lit_edit.data.loaders import save_requests

    assert len(EditEvaluation(requests=requests(), limit=1)._resolve_requests(None)) == 1
    path = tmp_path / "requests.json"
    save_requests(requests(), path)
    loaded = EditEvaluation(requests=str(path))._resolve_requests(None)
    assert [(r.prompt, r.target_new, r.locality) for r in loaded] == [(r.prompt, r.target_new, r.locality) for r in requests()]
    with pytest.raises(ValueError, match="no requests"):
        EditEvaluation()._resolve_requests(None)
    assert EditEvaluation(protocols=["perplexity"])._resolve_requests(None) == []


def test_unedited_evaluation_is_cached_by_weights_requests_and_settings(tok, tmp_path, monkeypatch, caplog):
    import logging

    import lightning as L

    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "home"))
    calls = []
    original = Evaluator.evaluate

    def counting(self, *args, **kwargs):
        calls.append(args[3] if len(args) > 3 else kwargs.get("reference"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", counting)

    def fit(seed=2, protocols=("probability", "token_accuracy", "generation")):
        module, datamodule = _make_module(tiny_llama(tok, seed=seed), tok)
        cb = EditEvaluation(protocols=list(protocols), max_new_tokens=4, batch_size=4, print_table=False, summary_dir=str(tmp_path))
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
        trainer.fit(module, datamodule=datamodule)
        return cb

    first = fit()
    assert len(calls) == 2  # before and after
    calls.clear()
    with caplog.at_level(logging.INFO, logger="lit_edit"):
        second = fit()
    assert len(calls) == 1 and calls[0] is not None  # only the edited model; the before figures came from the cache
    assert "unedited figures and reference from the cache" in caplog.text
    assert second.before == first.before and second.after == first.after
    assert all(torch.equal(second.reference.locality_argmax[k], v) for k, v in first.reference.locality_argmax.items())
    calls.clear()
    fit(seed=3)  # other weights: evaluated again
    assert len(calls) == 2
    calls.clear()
    fit(protocols=("probability", "token_accuracy"))  # other settings: evaluated again
    assert len(calls) == 2
    for path in (tmp_path / "home" / "unedited").glob("*.json"):  # a damaged file is ignored, with a log line
        path.write_text("{not json")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="lit_edit"):
        fit()
    assert len(calls) == 2 and "is unusable" in caplog.text
