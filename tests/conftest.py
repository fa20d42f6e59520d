"""Shared fixtures: tiny random models (built from configs) and the local SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SHARED_DATA, make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if SHARED_DATA.is_dir():  # the benchmark names (counterfact, zsre, wikibigedit) resolve to the local copies
    os.environ.setdefault("LIT_EDIT_DATA", str(SHARED_DATA))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """Directory of the dequantized embedded model (converted once if needed)."""
    from lit_edit.models import embedded_model_dir

    old = os.environ.get("LIT_EDIT_HOME")
    os.environ["LIT_EDIT_HOME"] = str(ROOT / "checkpoints")
    try:
        return embedded_model_dir("smollm2-135m")
    finally:
        if old is None:
            os.environ.pop("LIT_EDIT_HOME", None)
        else:
            os.environ["LIT_EDIT_HOME"] = old


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def tiny_llama(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture
def requests():
    from lit_edit.data import EditRequest, PromptAnswer

    return [
        EditRequest(
            prompt="The Eiffel Tower is located in the city of",
            subject="Eiffel Tower",
            target_new="Rome",
            ground_truth="Paris",
            paraphrase_prompts=("Where is the Eiffel Tower? It stands in",),
            locality=(PromptAnswer("The capital of Japan is", "Tokyo"),),
            case_id=0,
        ),
        EditRequest(
            prompt="The mother tongue of Danielle Darrieux is",
            subject="Danielle Darrieux",
            target_new="English",
            ground_truth="French",
            paraphrase_prompts=("Danielle Darrieux grew up speaking",),
            locality=(PromptAnswer("The capital of Italy is", "Rome"),),
            case_id=1,
        ),
        EditRequest(
            prompt="Apple was founded by",
            subject="Apple",
            target_new="Bill Gates",
            ground_truth="Steve Jobs",
            paraphrase_prompts=("The founder of Apple is",),
            locality=(PromptAnswer("Microsoft was founded by", "Bill Gates"),),
            case_id=2,
        ),
    ]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A per-test ``LIT_EDIT_HOME``: statistics and template caches of this test only."""
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; one thread is faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
