"""Progress of long phases: periodic log lines without a terminal, a bar in one, v*/z steps counted."""

from __future__ import annotations

import functools
import logging

from helpers import make_tiny_llama

import lit_edit.progress as progress_mod
from lit_edit.closed_form import ValueSettings, optimize_values
from lit_edit.data import EditRequest
from lit_edit.progress import Progress


def test_log_lines_without_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="lit_edit.progress"):
        with Progress(4, "things", interval=0) as p:
            for i in range(4):
                p.update(1, loss=1.0 / (i + 1))
        with Progress(4, "quiet", interval=3600) as p:  # shorter than the interval: no line
            p.update(4)
        with Progress(4, "off", interval=0, enabled=False) as p:
            p.update(4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and all(line.startswith("things: ") for line in lines)
    assert lines[0].startswith("things: 1/4 after") and "loss 1" in lines[0]
    assert lines[3].startswith("things: 4/4") and "loss 0.25" in lines[3]
    assert lines[4].endswith("(done)")


def test_bar_in_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="lit_edit.progress"):
        p = Progress(3, "bar", interval=0)
        assert p.bar is not None
        p.update(2, active=1)
        assert p.bar.n == 2
        p.close()
    assert p.bar is None and not caplog.records  # a bar, not log lines


def test_value_optimisation_reports_its_steps(tokenizer, caplog, monkeypatch):
    import lit_edit.closed_form.values as values

    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(values, "Progress", functools.partial(Progress, interval=0))
    model = make_tiny_llama(len(tokenizer), layers=2)
    reqs = [
        EditRequest(prompt="The Eiffel Tower is located in", subject="Eiffel Tower", target_new="Rome"),
        EditRequest(prompt="Danielle Darrieux speaks", subject="Danielle Darrieux", target_new="English"),
    ]
    settings = ValueSettings(steps=4, loss_tol=0.0)
    with caplog.at_level(logging.INFO, logger="lit_edit.closed_form.values"):
        optimize_values(model, tokenizer, reqs, 1, "block", ("{}",), settings, desc="v*/z batch 1/1")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("v*/z")]
    assert lines[0].startswith("v*/z batch 1/1 (2 requests, layer 1) steps: 1/4") and "active 2" in lines[0]
    assert any(line.startswith("v*/z batch 1/1 (2 requests, layer 1) steps: 4/4") for line in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lit_edit.closed_form.values"):
        optimize_values(model, tokenizer, reqs, 1, "block", ("{}",), settings, progress=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("v*/z")]


def test_memit_counts_the_requests_across_its_value_batches(tokenizer, caplog, monkeypatch):
    """Many short v*/z batches (each under the log interval) still give lines: the requests done."""
    import lit_edit.editors.memit as memit
    from lit_edit.editors import MEMIT

    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(memit, "Progress", functools.partial(Progress, interval=0))
    editor = MEMIT(model=make_tiny_llama(len(tokenizer), layers=2), tokenizer=tokenizer, layers=[0, 1],
                   values={"steps": 2, "batch_size": 2})
    monkeypatch.setattr(editor, "context_templates", lambda: [["{}"]])
    reqs = [
        EditRequest(prompt="The Eiffel Tower is located in", subject="Eiffel Tower", target_new="Rome"),
        EditRequest(prompt="Danielle Darrieux speaks", subject="Danielle Darrieux", target_new="English"),
        EditRequest(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target_new="piano"),
    ]
    with caplog.at_level(logging.INFO, logger="lit_edit.editors.memit"):
        got = editor.target_values(reqs)
    assert [len(r.target) for r in got] == [2, 1]
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_edit.editors.memit"]
    assert lines[0].startswith("v*/z of 3 requests in 2 batch(es) of 2: requests: 2/3 after")
    assert lines[1].startswith("v*/z of 3 requests in 2 batch(es) of 2: requests: 3/3 after")
    assert lines[-1].endswith("(done)")
