"""Published key statistics (the ROME/MEMIT ``.npz`` second-moment files) used in place of computing.

The files here are written in the published layout by the test itself (``np.savez`` with the
arrays a running second-moment statistic saves: ``mom2.mom2`` = Σ k kᵀ, ``mom2.count``,
``mom2.constructor``, ``sample_size``), from statistics lit_edit computes on a tiny random model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_llama, write_corpus

from lit_edit.data.request import EditRequest

LAYER = 1
MODULE = f"model.layers.{LAYER}.mlp.down_proj"
FAST = dict(n_samples=60, max_length=64, batch_size=16)
REQUEST = EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English", case_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_published(root: Path, model: str, module: str, total: np.ndarray, count, precision: str = "float64",
                    samples=60, name: str | None = None, **extra) -> Path:
    """A file as the ROME/MEMIT statistics collector saves it: ``<model>/wikipedia_stats/<module>_<precision>_mom2_<samples>.npz``."""
    path = root / model / "wikipedia_stats" / (name or f"{module}_{precision}_mom2_{samples}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.count": np.array(count),
        "mom2.mom2": np.asarray(total, dtype=precision),
        "sample_size": np.array(samples),
        **extra,
    }
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture(scope="module")
def computed(tokenizer, tmp_path_factory):
    """lit_edit's own statistics of the tiny model (mean and token count) and the corpus they came from."""
    from lit_edit.stats import second_moment

    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    model = make_tiny_llama(len(tokenizer))
    sm = second_moment(model, tokenizer, LAYER, corpus=corpus, dtype="float64", cache=False, progress=False, **FAST)
    return {"corpus": corpus, "mean": sm.mom2, "count": sm.count}


@pytest.fixture
def published(computed, tmp_path):
    """A published-format file holding Σ k kᵀ (= mean · count) of the tiny model's layer 1."""
    total = (computed["mean"] * computed["count"]).numpy()
    return write_published(tmp_path / "stats", "tiny-llama-seed0", MODULE, total, computed["count"])


def _rome(tokenizer, corpus, **statistics):
    from lit_edit.editors import ROME

    return ROME(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, layers=LAYER, values={"steps": 3},
                statistics={**FAST, "corpus": corpus, **statistics})


def _fit(editor):
    import lightning as L

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(editor, train_dataloaders=torch.utils.data.DataLoader([REQUEST], batch_size=1, collate_fn=list))
    return editor.weight(LAYER).detach().clone()


def _no_computing(monkeypatch):
    import lit_edit.stats as stats

    def computing(*args, **kwargs):
        raise AssertionError("key statistics were computed although published ones were given")

    monkeypatch.setattr(stats, "second_moment", computing)
    monkeypatch.setattr(stats, "accumulate_second_moment", computing)


# --------------------------------------------------------------------------- reading


def test_reader_returns_mean_of_stored_sum(computed, published):
    from lit_edit.published_stats import parse_published_name, read_published_stats

    got = read_published_stats(published, d_in=128)
    with np.load(published) as npz:
        expected = torch.from_numpy(npz["mom2.mom2"]) / int(npz["mom2.count"])
    assert got.count == computed["count"] and got.sample_size == 60 and got.precision == "float64"
    assert torch.equal(got.mom2, expected)  # the file stores the sum; the mean is mom2 / count
    assert torch.allclose(got.mom2, computed["mean"], rtol=1e-12, atol=0)
    name = parse_published_name(published)
    assert (name.module, name.precision, name.stats, name.samples, name.corpus, name.model) == (
        MODULE, "float64", ("mom2",), 60, "wikipedia", "tiny-llama-seed0")
    assert parse_published_name("transformer.h.17.mlp.c_proj_float32_mean-mom2_t512_100000.npz").stats == ("mean", "mom2")
    assert parse_published_name("x/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2.npz").samples is None
    assert parse_published_name("stats.npz") is None


# --------------------------------------------------------------------------- the editor uses them


def test_rome_fits_with_published_statistics_without_computing(tokenizer, computed, published, cache, monkeypatch, caplog):
    reference = _fit(_rome(tokenizer, computed["corpus"]))  # lit_edit computes the same statistics itself

    _no_computing(monkeypatch)
    editor = _rome(tokenizer, computed["corpus"], published=str(published))
    with caplog.at_level(logging.INFO, logger="lit_edit.published_stats"):
        edited = _fit(editor)
    assert "using published statistics for tiny-llama-seed0 layer 1 mlp.down_proj instead of computing them" in caplog.text
    assert str(published) in caplog.text
    assert torch.allclose(editor.key_statistics(LAYER), computed["mean"], rtol=1e-12, atol=0)
    assert torch.allclose(edited, reference, rtol=0, atol=1e-6)
    assert not torch.equal(edited, make_tiny_llama(len(tokenizer)).model.layers[LAYER].mlp.down_proj.weight)

    # the import sits in lit_edit's statistics cache with its provenance, and is read from there next time
    sidecars = [json.loads(p.read_text()) for p in (cache / "stats").glob("*.json")]
    imported = [s for s in sidecars if s["key"]["corpus"].startswith("published:")]
    assert len(sidecars) == 2 and len(imported) == 1  # the reference's computed statistics, and the import
    side = imported[0]
    assert side["key"]["corpus"] == "published:wikipedia" and side["key"]["n_samples"] == 60
    assert side["key"]["layer"] == LAYER and side["key"]["module"] == "mlp.down_proj"
    prov = side["provenance"]
    assert prov["source"] == str(published.resolve()) and prov["corpus"] == "wikipedia"
    assert (prov["sample_size"], prov["tokens"], prov["dtype"]) == (60, computed["count"], "float64")
    caplog.clear()
    again = _rome(tokenizer, computed["corpus"], published=str(published.parent.parent.parent))  # the directory
    with caplog.at_level(logging.INFO, logger="lit_edit.published_stats"):
        assert torch.equal(again.key_statistics(LAYER), editor.key_statistics(LAYER))
    assert "imported earlier" in caplog.text


def test_directory_search_names_missing_and_ambiguous(tokenizer, computed, published, cache):
    from lit_edit.published_stats import PublishedStatsError, find_published_stats

    root = published.parent.parent.parent
    assert find_published_stats(root, MODULE) == published
    with pytest.raises(PublishedStatsError, match=r"no published statistics for model\.layers\.0\.mlp\.down_proj under .*stats"):
        find_published_stats(root, "model.layers.0.mlp.down_proj")
    other = write_published(root, "other-model", MODULE, np.eye(128), 10)
    with pytest.raises(PublishedStatsError, match="several published statistics files"):
        find_published_stats(root, MODULE)
    assert find_published_stats(root, MODULE, model_dir="tiny-llama-seed0") == published
    assert find_published_stats(root, MODULE, model_dir="other-model") == other


def test_memit_reads_each_layer_from_a_directory(tokenizer, computed, cache, tmp_path, monkeypatch, caplog):
    from lit_edit.editors import MEMIT
    from lit_edit.stats import second_moment

    model = make_tiny_llama(len(tokenizer))
    root = tmp_path / "stats"
    expected = {}
    for layer in (0, 1):
        sm = second_moment(model, tokenizer, layer, corpus=computed["corpus"], dtype="float64", cache=False, progress=False, **FAST)
        write_published(root, "tiny-llama-seed0", f"model.layers.{layer}.mlp.down_proj", (sm.mom2 * sm.count).numpy(), sm.count)
        expected[layer] = sm.mom2
    _no_computing(monkeypatch)
    editor = MEMIT(model=model, tokenizer=tokenizer, layers=[0, 1], statistics={"published": str(root), "update_weight": 10.0})
    with caplog.at_level(logging.INFO, logger="lit_edit.published_stats"):
        editor.prepare_statistics()
    for layer in (0, 1):
        assert torch.allclose(editor.key_statistics(layer), expected[layer], rtol=1e-12, atol=0)
        assert f"layer {layer} mlp.down_proj instead of computing them" in caplog.text


def test_gpt2_file_in_the_published_naming(tokenizer, cache, tmp_path):
    """GPT-2's published names (``transformer.h.<l>.mlp.c_proj``, float32) are lit_edit's module names too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_edit.published_stats import import_published_stats

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4)).eval()
    model.config.name_or_path = "gpt2-xl"
    keys = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)  # c_proj's input: 4 × n_embd
    total = keys.T @ keys
    path = write_published(tmp_path / "stats", "gpt2-xl", "transformer.h.1.mlp.c_proj", total, 1000, precision="float32", samples=100000)
    assert path.name == "transformer.h.1.mlp.c_proj_float32_mom2_100000.npz"
    sm = import_published_stats(model, 1, tmp_path / "stats")
    assert sm.count == 1000 and sm.key.n_samples == 100000 and sm.key.module == "mlp.c_proj"
    assert torch.equal(sm.mom2, torch.from_numpy(total).double() / 1000)


# --------------------------------------------------------------------------- refused files


def _damage(path: Path, **arrays) -> Path:
    with np.load(path) as npz:
        content = {k: npz[k] for k in npz.files}
    content.update(arrays)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in content.items() if v is not None})
    return path


def _square(d=128, seed=0):
    a = np.random.default_rng(seed).standard_normal((d, 3 * d))
    return a @ a.T


DAMAGED = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:200]), r"cannot be read as an \.npz file"),
    "not an npz": (lambda p: p.write_text("not a zip"), r"cannot be read as an \.npz file"),
    "nan": (lambda p: _damage(p, **{"mom2.mom2": np.where(np.eye(128) > 0, np.nan, _square())}), "NaN or inf"),
    "inf": (lambda p: _damage(p, **{"mom2.mom2": np.full((128, 128), np.inf)}), "NaN or inf"),
    "zero count": (lambda p: _damage(p, **{"mom2.count": np.array(0)}), r"token count mom2\.count is .*0.*not a positive integer"),
    "fractional count": (lambda p: _damage(p, **{"mom2.count": np.array(2.5)}), "not a positive integer"),
    "all zero": (lambda p: _damage(p, **{"mom2.mom2": np.zeros((128, 128))}), "all zero"),
    "asymmetric": (lambda p: _damage(p, **{"mom2.mom2": np.triu(_square())}), "not symmetric"),
    "negative diagonal": (lambda p: _damage(p, **{"mom2.mom2": -_square()}), "negative diagonal"),
    "not square": (lambda p: _damage(p, **{"mom2.mom2": np.ones((128, 64))}), r"shape \(128, 64\).*square"),
    "no mom2": (lambda p: _damage(p, **{"mom2.mom2": None}), r"holds no second moment .*'mom2\.mom2'"),
    "other statistic": (lambda p: _damage(p, **{"mom2.constructor": np.array("util.runningstats.Covariance()")}), "not a SecondMoment"),
    "precision": (lambda p: _damage(p, **{"mom2.mom2": _square().astype(np.float32)}), "name says float64 but mom2.mom2 is float32"),
    "sample size": (lambda p: _damage(p, sample_size=np.array(7)), "name says 60 samples but its sample_size array says 7"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_damaged_file_refused_before_any_weight_changes(tokenizer, computed, published, cache, monkeypatch, damage):
    from lit_edit.published_stats import PublishedStatsError

    spoil, message = DAMAGED[damage]
    spoil(published)
    _no_computing(monkeypatch)
    editor = _rome(tokenizer, computed["corpus"], published=str(published))
    before = editor.weight(LAYER).detach().clone()
    with pytest.raises(PublishedStatsError, match=rf"published statistics file .*{published.name} is unusable: .*{message}"):
        _fit(editor)
    assert torch.equal(editor.weight(LAYER), before) and not editor.touched
    assert not list(cache.glob("stats/*.pt"))


MISMATCHED = {
    # another block's file, named as the published collector names it
    "layer": (dict(module="model.layers.0.mlp.down_proj"), r"holds the statistics of model\.layers\.0\.mlp\.down_proj, but this edit needs "
              r"those of model\.layers\.1\.mlp\.down_proj"),
    # another model's module name (GPT-2 XL's block 17)
    "module": (dict(module="transformer.h.17.mlp.c_proj"), r"holds the statistics of transformer\.h\.17\.mlp\.c_proj"),
    # the right name but a wider model's matrix
    "d_in": (dict(total=np.eye(256)), r"256 × 256, the module's input needs 128 × 128"),
    # a name that does not say which layer it is for
    "unnamed": (dict(name="layer1.npz"), "does not follow the published pattern"),
    # the mean of another statistic: no mom2 in the name
    "stats": (dict(name=f"{MODULE}_float64_mean_60.npz"), "its name says it holds mean, not mom2"),
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHED))
def test_mismatched_file_refused(tokenizer, computed, tmp_path, cache, monkeypatch, mismatch):
    from lit_edit.published_stats import PublishedStatsError

    change, message = MISMATCHED[mismatch]
    args = {"module": MODULE, "total": (computed["mean"] * computed["count"]).numpy(), **change}
    path = write_published(tmp_path / "stats", "tiny-llama-seed0", args.pop("module"), args.pop("total"), computed["count"], **args)
    _no_computing(monkeypatch)
    editor = _rome(tokenizer, computed["corpus"], published=str(path))
    before = editor.weight(LAYER).detach().clone()
    with pytest.raises(PublishedStatsError, match=message) as err:
        _fit(editor)
    assert path.name in str(err.value)
    assert torch.equal(editor.weight(LAYER), before) and not editor.touched


def test_option_checks():
    from lit_edit.editors import StatisticsOptions

    assert StatisticsOptions(published="stats/").published == "stats/"
    with pytest.raises(ValueError, match=r"statistics\.published"):
        StatisticsOptions(published=" ")
    with pytest.raises(ValueError, match=r"statistics\.published .*statistics\.adjustment"):
        StatisticsOptions(published="stats/", adjustment=False)
    with pytest.raises(Exception, match="does not exist"):
        from lit_edit.published_stats import find_published_stats

        find_published_stats("/nonexistent/stats.npz", MODULE)
