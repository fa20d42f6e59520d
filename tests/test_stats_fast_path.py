"""Key statistics of several layers from one forward per batch (float32 products summed in
float64) against the per-layer float64 reference, and their per-layer cache files."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from helpers import make_tiny_llama, write_corpus

from lit_edit import stats
from lit_edit.stats import (
    StatsKey,
    accumulate_second_moment,
    accumulate_second_moments,
    second_moment,
    second_moments,
    stats_path,
)

RTOL = 1e-5
"""New (float32 products per batch of ≤ 8 texts, float64 sums) vs per-layer float64: relative to the largest entry."""


@pytest.fixture
def model(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=1, layers=4)


@pytest.fixture
def rows(tokenizer, tmp_path):
    corpus = write_corpus(tmp_path)
    lines = [line for line in open(corpus, encoding="utf-8").read().splitlines() if line.strip()]
    return [tokenizer(t, add_special_tokens=True)["input_ids"][:24] for t in lines[:30]]


def _mlp_out(model, layer):
    return model.model.layers[layer].mlp.down_proj


def test_several_layers_match_the_per_layer_float64_reference(model, tokenizer, rows):
    modules = [_mlp_out(model, layer) for layer in (0, 2, 3)]
    sums, count = accumulate_second_moments(model, modules, rows, tokenizer.pad_token_id, batch_size=8, progress=False)
    assert count == sum(map(len, rows))
    for module, total in zip(modules, sums):
        ref, ref_count = accumulate_second_moment(model, module, rows, tokenizer.pad_token_id, torch.float64, 8, progress=False)
        assert ref_count == count and total.dtype == torch.float64 and total.shape == ref.shape
        assert (total - ref).abs().max() <= RTOL * ref.abs().max()
        assert torch.allclose(total, total.T)


def test_one_forward_equals_each_layer_alone(model, tokenizer, rows):
    modules = [_mlp_out(model, layer) for layer in (1, 2)]
    together, count = accumulate_second_moments(model, modules, rows, tokenizer.pad_token_id, batch_size=5, progress=False)
    for module, total in zip(modules, together):
        alone, alone_count = accumulate_second_moments(model, [module], rows, tokenizer.pad_token_id, batch_size=5, progress=False)
        assert alone_count == count and torch.equal(alone[0], total)


def test_the_forward_stops_after_the_highest_hooked_module(model, tokenizer, rows):
    ran = []
    handle = model.model.layers[3].register_forward_pre_hook(lambda *a: ran.append(3))
    try:
        accumulate_second_moments(model, [_mlp_out(model, 2), _mlp_out(model, 0)], rows, tokenizer.pad_token_id, progress=False)
    finally:
        handle.remove()
    assert ran == []
    with pytest.raises(ValueError, match="same module twice"):
        accumulate_second_moments(model, [_mlp_out(model, 0)] * 2, rows, tokenizer.pad_token_id, progress=False)


def test_second_moments_caches_each_layer_and_computes_only_the_missing(model, tokenizer, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    args = dict(corpus=corpus, n_samples=20, max_length=24, cache_dir=tmp_path / "stats", progress=False)
    first = second_moments(model, tokenizer, [2], **args)[2]
    assert not first.cached and first.key.products == "float32" and first.key.dtype == "float64"
    asked = []
    real = stats.accumulate_second_moments
    monkeypatch.setattr(stats, "accumulate_second_moments", lambda m, modules, *a, **k: asked.append(len(modules)) or real(m, modules, *a, **k))
    got = second_moments(model, tokenizer, [0, 2, 3], **args)
    assert list(got) == [0, 2, 3] and asked == [2]  # layers 0 and 3 in one pass, layer 2 from disk
    assert got[2].cached and torch.equal(got[2].mom2, first.mom2)
    assert not got[0].cached and not got[3].cached
    for layer, sm in got.items():
        path = stats_path(sm.key, tmp_path / "stats")
        assert path.exists() and json.loads(path.with_suffix(".json").read_text())["key"]["layer"] == layer
    again = second_moments(model, tokenizer, [3, 0], **args)
    assert asked == [2] and all(sm.cached for sm in again.values())
    # the per-layer float64 reference has its own key (no products field: the digest of earlier versions)
    ref = second_moment(model, tokenizer, 0, **args)
    assert not ref.cached and ref.key.products is None and ref.key.digest() != got[0].key.digest()
    assert "products" not in ref.key.as_dict()
    legacy = {k: v for k, v in asdict(ref.key).items() if k != "products"}
    import hashlib

    assert ref.key.digest() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:24]
    assert (got[0].mom2 - ref.mom2).abs().max() <= RTOL * ref.mom2.abs().max()
    assert second_moment(model, tokenizer, 0, **args).cached  # a sidecar without the products field is read back


def test_bad_products_are_refused(model, tokenizer, tmp_path):
    corpus = write_corpus(tmp_path)
    with pytest.raises(ValueError, match="products"):
        second_moments(model, tokenizer, [0], corpus=corpus, n_samples=2, dtype="float32", products="float64", cache=False)
    with pytest.raises(ValueError, match="at least one layer"):
        second_moments(model, tokenizer, [], corpus=corpus, n_samples=2, cache=False)
    assert isinstance(StatsKey("m", None, "w", 0, "mlp", "c", "v", 1, 2, "float64").as_dict(), dict)


def test_closed_form_editor_prepares_its_layers_in_one_pass(tokenizer, tmp_path, monkeypatch):
    from lit_edit.editors import MEMIT
    from lit_edit.editors.closed_form import StatisticsOptions

    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "home"))
    model = make_tiny_llama(len(tokenizer), seed=2, layers=4)
    editor = MEMIT(
        model=model, tokenizer=tokenizer, layers=[1, 2, 3],
        statistics=StatisticsOptions(corpus=write_corpus(tmp_path), n_samples=10, max_length=16, update_weight=1.0),
    )
    asked = []
    real = stats.accumulate_second_moments
    monkeypatch.setattr(stats, "accumulate_second_moments", lambda m, modules, *a, **k: asked.append(len(modules)) or real(m, modules, *a, **k))
    editor.prepare_statistics()
    assert asked == [3]
    assert all(editor.key_statistics(layer).shape == (128, 128) for layer in (1, 2, 3))
