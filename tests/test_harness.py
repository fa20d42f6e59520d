"""The ``harness`` evaluation protocol: lm-evaluation-harness tasks on the in-memory model, offline.

The task is the local multiple-choice example shipped with the package (a YAML on a JSONL file);
its accuracy is checked against a hand computation from the model's log-likelihoods.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data.request import EditRequest

FIGURE = "harness/lit_edit_capitals/acc"


pytestmark = pytest.mark.usefixtures("one_thread")


def _require_lm_eval():
    """The protocol's tests run, never skip: ``make setup`` installs the ``lmeval`` extra."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pytest.fail("lm-eval is not installed; the test set-up installs it: pip install -e '.[test,plot,lmeval]' (make setup)")


def _example():
    from lit_edit.evaluation.harness import EXAMPLE_TASK

    return EXAMPLE_TASK


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context), the continuation tokenized as part of the whole text."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx
    logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return float(sum(logits[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def hand_accuracy(model, tokenizer) -> float:
    """The example task's accuracy: the answer's choice has the highest log-likelihood after the question."""
    docs = [json.loads(line) for line in (_example().parent / "capitals.jsonl").read_text().splitlines() if line.strip()]
    hits = []
    for d in docs:
        scores = [loglikelihood(model, tokenizer, d["question"], " " + c) for c in d["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return sum(hits) / len(docs)


def test_protocol_runs_local_task_offline_and_matches_hand_computation(tokenizer, monkeypatch):
    _require_lm_eval()
    from lit_edit.evaluation import Evaluator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_tiny_llama(len(tokenizer), seed=1)  # a seed whose accuracy the change below moves (0.5 → 0.625)
    model.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    random.seed(123)
    torch.manual_seed(123)
    rng = (random.getstate(), torch.get_rng_state())

    evaluator = Evaluator(["harness"], batch_size=4, harness={"tasks": [str(_example())]})
    assert not evaluator.needs_requests
    result = evaluator.evaluate(model, tokenizer, [])
    assert set(result.figures) == {FIGURE}
    before = result.figures[FIGURE]
    assert before == pytest.approx(hand_accuracy(model, tokenizer), abs=1e-12)
    # the model and the run's random states are as they were
    assert model.training
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert random.getstate() == rng[0] and torch.equal(torch.get_rng_state(), rng[1])

    # a changed model changes the figure the same way the hand computation does
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    after = evaluator.evaluate(model, tokenizer, []).figures[FIGURE]
    assert after == pytest.approx(hand_accuracy(model, tokenizer), abs=1e-12) and after != before
    assert evaluator.evaluate(model, tokenizer, []).figures[FIGURE] == after  # deterministic


def test_callback_reports_before_and_after_an_edit(tokenizer, cache, tmp_path, monkeypatch):
    _require_lm_eval()
    import lightning as L

    from lit_edit.editors import ROME
    from lit_edit.evaluation import EditEvaluation

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    editor = ROME(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, layers=1, values={"steps": 5},
                  statistics={"adjustment": False})
    request = EditRequest(prompt="The capital of Australia is", subject="Australia", target_new="Sydney", case_id=0)
    callback = EditEvaluation(protocols=["harness"], harness={"tasks": [str(_example())]}, batch_size=4,
                              summary_dir=str(tmp_path), print_table=False)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    trainer.fit(editor, train_dataloaders=torch.utils.data.DataLoader([request], batch_size=1, collate_fn=list))

    summary = json.loads((tmp_path / "summary.json").read_text())
    figure = summary["figures"][FIGURE]
    assert figure["protocol"] == "harness" and "lit_edit_capitals" in figure["description"]
    assert "capitals.yaml" in summary["protocols"]["harness"]
    assert figure["before"] == pytest.approx(hand_accuracy(make_tiny_llama(len(tokenizer)), tokenizer), abs=1e-12)
    assert figure["after"] == pytest.approx(hand_accuracy(editor.model, tokenizer), abs=1e-12)
    assert editor.touched  # the edit was made between the two evaluations


def test_unedited_cache_key_follows_the_tasks(tokenizer, tmp_path):
    _require_lm_eval()
    from lit_edit.evaluation import Evaluator, UneditedCache

    task = tmp_path / "task" / "capitals.yaml"
    shutil.copytree(_example().parent, task.parent)
    model = make_tiny_llama(len(tokenizer))

    def key(**harness):
        return UneditedCache.key(Evaluator(["harness"], harness=harness), model, [], 0, 1, tokenizer)

    one = key(tasks=[str(task)])
    assert str(task) in one["protocols"]["harness"]
    assert key(tasks=[str(task)]) == one
    assert key(tasks=[str(task)], limit=3) != one
    assert key(tasks=[str(task)], num_fewshot=1) != one
    assert key(tasks=[str(task), "arc_easy"]) != one
    data = task.parent / "capitals.jsonl"
    data.write_text(data.read_text().replace("Canberra", "Perth"))
    assert key(tasks=[str(task)]) != one  # the local task's data is part of the key


def test_relative_data_files_and_bad_task_files(tmp_path):
    _require_lm_eval()
    from lit_edit.evaluation.harness import HarnessOptions, load_task_file

    cfg = load_task_file(_example())
    assert cfg["task"] == "lit_edit_capitals"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(_example().parent / "capitals.jsonl")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(ValueError, match=r"bad\.yaml defines no task"):
        load_task_file(bad)
    bad.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: missing.jsonl\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: data file\(s\) .*missing\.jsonl.* do not exist"):
        load_task_file(bad)
    with pytest.raises(ValueError, match=r"harness\.tasks: task file .*nowhere\.yaml does not exist"):
        HarnessOptions(tasks=[str(tmp_path / "nowhere.yaml")])
    with pytest.raises(ValueError, match=r"harness\.limit"):
        HarnessOptions(tasks=["arc_easy"], limit=0)


def test_settings_must_agree_with_the_protocols():
    _require_lm_eval()
    from lit_edit.evaluation import Evaluator

    with pytest.raises(ValueError, match="'harness' protocol needs at least one task"):
        Evaluator(["harness"])
    with pytest.raises(ValueError, match=r"harness tasks \['arc_easy'\] are given but 'harness' is not among the protocols"):
        Evaluator(["probability"], harness={"tasks": ["arc_easy"]})
    with pytest.raises(ValueError, match=r"unknown harness option\(s\) \['task'\]"):
        Evaluator(["harness"], harness={"task": ["arc_easy"]})


def test_figures_from_lm_eval_results():
    from lit_edit.evaluation.harness import harness_figures
    from lit_edit.evaluation.protocols import figure_description, protocol_of

    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.25, "sample_len": 10},
        "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": "N/A", "exact_match,flexible-extract": 0.2},
    }
    assert harness_figures(results) == {
        "harness/arc_easy/acc": 0.5,
        "harness/arc_easy/acc_norm": 0.25,
        "harness/gsm8k/exact_match/strict-match": 0.125,
        "harness/gsm8k/exact_match/flexible-extract": 0.2,
    }
    assert protocol_of("harness/arc_easy/acc") == "harness"
    assert figure_description("harness/arc_easy/acc") == "lm-evaluation-harness task arc_easy: acc"


def test_missing_extra_is_a_clear_error(monkeypatch):
    from lit_edit.evaluation import EditEvaluation, Evaluator

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"'harness' evaluation protocol .*pip install lit-edit\[lmeval\]"):
        Evaluator(["harness"], harness={"tasks": ["arc_easy"]})
    with pytest.raises(ImportError, match=r"pip install lit-edit\[lmeval\]"):
        EditEvaluation(protocols=["probability", "harness"], harness={"tasks": ["arc_easy"]})
    assert Evaluator(["probability"]).protocols == ("probability",)  # the other protocols need no extra


def test_example_task_ships_with_the_package():
    path = _example()
    assert path.is_file() and (path.parent / "capitals.jsonl").is_file()
    assert Path(path).suffix == ".yaml"
