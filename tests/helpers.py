"""Helpers shared by the tests: tiny random models, a small generic corpus, the real-data marker."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
"""Real benchmark records (CounterFact, zsRE, WikiBigEdit) laid beside the repository for tests and CI."""
EMBEDDED_DIR = ROOT / "checkpoints" / "smollm2-135m"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_FILES = {
    "counterfact": FIXTURES / "counterfact_nested.json",
    "counterfact_flat": FIXTURES / "counterfact_flat.json",
    "zsre": FIXTURES / "zsre_mend.json",
    "wikibigedit": FIXTURES / "wikibigedit.jsonl",
    "lit_edit": FIXTURES / "lit_edit.jsonl",
}
"""One small file per record schema."""


def raw_records(schema: str) -> list[dict]:
    """The fixture of a schema as plain dicts (a fresh copy each call)."""
    path = FIXTURE_FILES[schema]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, **config):
    """A 2-block random Llama; ``config`` overrides ``LlamaConfig`` fields (e.g. token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
            **config,
        }
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.name_or_path = f"tiny-llama-seed{seed}"
    return model


def write_corpus(directory) -> str:
    """A small generic-text file (60 lines of 40 frequent English words) for key statistics."""
    path = Path(directory) / "corpus.txt"
    words = "the of and a in to was is for on as by with he at from his an were are which this be".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (40,), generator=g).tolist()) for _ in range(60)]
    path.write_text("\n".join(lines))
    return str(path)


def requires_shared_data(name: str):
    path = SHARED_DATA / name
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (real benchmark data lives in ../shared/data)")


def load_recipe(name: str):
    """The module of ``recipes/<name>.py`` (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(path, tokenizer, layers: int = 2):
    """A tiny random Llama and ``tokenizer`` saved to ``path`` (a model directory recipes can load)."""
    make_tiny_llama(len(tokenizer), layers=layers).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
