"""Locate-and-edit machinery and the ROME / MEMIT / EMMET editors on tiny random models.

Exactness of the closed forms, the fact-token error, batched == one-by-one value optimisation,
partial == full forward, statistics cache keys, and that an edit touches only the edit-layer
tensors and restores bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_corpus

from lit_edit.data.request import EditRequest, RecordError

REQUESTS = [
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English", case_id=0),
    EditRequest(prompt="Paris is the capital of", subject="Paris", target_new="Italy", case_id=1),
    EditRequest(prompt="The Eiffel Tower is located in", subject="Eiffel Tower", target_new="Rome", case_id=2),
    EditRequest(prompt="Steve Jobs founded", subject="Steve Jobs", target_new="Microsoft Windows", case_id=3),
]


def _llama(tokenizer, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    m.config.name_or_path = "tiny-llama"
    return m


def _gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    m = GPT2LMHeadModel(cfg).eval()
    m.config.name_or_path = "tiny-gpt2"
    return m




FAST_VALUES = dict(steps=3)
FAST_STATISTICS = dict(n_samples=60, max_length=64, batch_size=16)


def _editor(cls, tokenizer, tmp_path, model=None, values=None, statistics=None, **kw):
    from lit_edit.editors.closed_form import StatisticsOptions, ValueOptions

    model = model if model is not None else _llama(tokenizer)
    values = ValueOptions(**{**FAST_VALUES, **(values or {})})
    statistics = StatisticsOptions(**{**FAST_STATISTICS, "corpus": write_corpus(tmp_path), **(statistics or {})})
    return cls(model=model, tokenizer=tokenizer, values=values, statistics=statistics, **kw)


# --------------------------------------------------------------------------- fact token


def test_fact_token_is_subject_last_token(tokenizer):
    from lit_edit.closed_form import encode_in_template

    e = encode_in_template(tokenizer, REQUESTS[0], "Hello there. {}")
    toks = tokenizer.convert_ids_to_tokens(e.ids)
    assert toks[e.fact_index] == "ux" and toks[e.fact_index + 1] == "Ġis"


def test_fact_token_missing_subject_names_record(tokenizer):
    from lit_edit.closed_form import encode_in_template

    bad = EditRequest(prompt="The capital of France is", subject="Germany", target_new="Berlin", case_id="cf-17")
    with pytest.raises(RecordError, match="cf-17.*Germany"):
        encode_in_template(tokenizer, bad)


# --------------------------------------------------------------------------- solves


def _rand_problem(d_in=12, d_out=7, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / A.shape[1]
    return torch.randn(d_in, E, generator=g, dtype=torch.float64), torch.randn(d_out, E, generator=g, dtype=torch.float64), C


def test_emmet_exact_constraints_and_rome_equivalence():
    from lit_edit.closed_form import emmet_solve, rome_solve

    K, R, C = _rand_problem()
    delta, cond = emmet_solve(K, R, C, mom2_weight=15000.0, emmet_lambda=0.0)
    assert torch.allclose(delta @ K, R, atol=1e-8) and cond > 1
    d1, _ = emmet_solve(K[:, :1], R[:, :1], C, mom2_weight=3.0, emmet_lambda=0.0)
    assert torch.allclose(d1, rome_solve(K[:, 0], R[:, 0], C), atol=1e-10)


def test_memit_solve_matches_independent_least_squares():
    from lit_edit.closed_form import memit_solve

    K, R, C = _rand_problem(E=9)
    lam = 2.5
    delta = memit_solve(K, R, C, lam)
    # min λ‖Δ L‖² + ‖Δ K − R‖² with C = L Lᵀ, as one stacked least-squares problem
    L = torch.linalg.cholesky(C)
    A = torch.cat([lam**0.5 * L, K], 1)  # d_in × (d_in + E)
    B = torch.cat([torch.zeros(R.shape[0], L.shape[1], dtype=R.dtype), R], 1)
    ref = torch.linalg.lstsq(A.T, B.T).solution.T
    assert torch.allclose(delta, ref, atol=1e-9)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_values_equal_one_by_one_and_full_forward(tokenizer, arch):
    from lit_edit.closed_form import ValueSettings, optimize_values

    model = _llama(tokenizer) if arch == "llama" else _gpt2(tokenizer)
    templates = ["{}", "Once upon a time. {}"]
    s = ValueSettings(steps=4, loss_tol=0.0)
    for site in ("mlp_out", "block"):
        batched = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s)
        single = torch.cat([optimize_values(model, tokenizer, [r], 1, site, templates, s).target for r in REQUESTS[:3]])
        full = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s, partial=False)
        assert torch.allclose(batched.target, single, atol=1e-4)
        assert torch.allclose(batched.target, full.target, atol=1e-5)
        assert (batched.delta.norm(dim=1) > 0).all()
        assert (batched.steps == 3).all()


@pytest.mark.parametrize("site", ["mlp_out", "block"])
def test_values_in_length_groups_equal_one_padded_batch(tokenizer, site):
    """Rows of very different lengths run as several length groups: the same vectors, losses
    and step counts as one batch padded to the longest row (and as the whole-model run)."""
    from lit_edit.closed_form import ValueSettings, optimize_values
    from lit_edit.closed_form.values import _Rows
    from lit_edit.losses import length_groups

    model = _llama(tokenizer)
    long = "In a long and winding description that goes on for many words about places, people and times. " * 2
    templates = ["{}", "Once upon a time. {}", long + "{}"]
    rows = _Rows(tokenizer, REQUESTS[:3], templates, "{} is a")
    assert len(length_groups(rows.mask.sum(1).tolist())) > 1
    s = ValueSettings(steps=4, loss_tol=0.0)
    grouped = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s)
    padded = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s, group_rows=False)
    full = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s, partial=False, group_rows=False)
    for other in (padded, full):
        torch.testing.assert_close(grouped.target, other.target, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grouped.loss, other.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(grouped.steps, other.steps)
    assert (grouped.delta.norm(dim=1) > 0).all()


# --------------------------------------------------------------------------- editors


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_writes_v_star_exactly_and_restores(tokenizer, cache, arch):
    from lit_edit.closed_form import keys_at, mlp_out_module, optimize_values
    from lit_edit.editors import ROME

    model = _llama(tokenizer) if arch == "llama" else _gpt2(tokenizer)
    ed = _editor(ROME, tokenizer, cache, model=model, layers=1)
    before = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
    r = REQUESTS[0]
    groups = ed.context_templates()
    k_star = keys_at(ed.model, tokenizer, [r], 1, groups)[0]
    with torch.enable_grad():
        v_star = optimize_values(ed.model, tokenizer, [r], 1, "mlp_out", [t for g in groups for t in g], ed.value_settings()).target[0]
    diag = ed.edit([r])
    out = mlp_out_module(ed.model, 1)(k_star).detach()
    assert torch.allclose(out, v_star, atol=1e-4 * max(1.0, float(v_star.norm())))
    assert diag["residual"] < 1e-5 and diag["update_norm"] > 0
    changed = [n for n, p in ed.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [ed.weight_name(1)] == ed.touched
    ed.restore()
    assert all(torch.equal(p, before[n]) for n, p in ed.model.named_parameters())


def test_emmet_editor_constraints_and_memit_editor_solution(tokenizer, cache):
    from lit_edit.closed_form import block_outputs_at, keys_at
    from lit_edit.editors import EMMET, MEMIT

    em = _editor(EMMET, tokenizer, cache, layers=[2], emmet_lambda=0.0)
    W0 = em.weight(2).detach().clone()
    Z = torch.cat([v.target for v in em.target_values(REQUESTS)])
    cur = block_outputs_at(em.model, tokenizer, REQUESTS, 2)
    K = keys_at(em.model, tokenizer, REQUESTS, 2, em.context_templates())
    diag = em.edit(REQUESTS)
    # every constraint holds: Ŵ k_i = W k_i + (z_i − h_i), i.e. ΔW K = R
    dW = (em.weight(2).detach() - W0).double()
    R = (Z - cur).double()
    assert torch.allclose(dW @ K.T.double(), R.T, atol=1e-4 * float(R.abs().max()))
    assert diag["layer_residual/layer2"] < 1e-6 and diag["cond_D/layer2"] >= 1

    me = _editor(MEMIT, tokenizer, cache, model=_llama(tokenizer), layers=[1, 2])
    C1 = me.key_statistics(1)
    vals = me.target_values(REQUESTS)
    Z = torch.cat([v.target for v in vals])
    K1 = keys_at(me.model, tokenizer, REQUESTS, 1, me.context_templates())
    cur = block_outputs_at(me.model, tokenizer, REQUESTS, 2)
    W1 = me.weight(1).detach().clone()
    me.edit(REQUESTS)
    got = (me.weight(1).detach() - W1).double()
    # closed form for the first layer, solved independently as a stacked least-squares problem
    lam = float(me.settings.statistics.update_weight)
    R = ((Z - cur) / 2).T.double()
    L = torch.linalg.cholesky(C1.double() + 1e-12 * torch.eye(C1.shape[0], dtype=torch.float64))
    A = torch.cat([lam**0.5 * L, K1.T.double()], 1)
    B = torch.cat([torch.zeros(R.shape[0], L.shape[1], dtype=torch.float64), R], 1)
    ref = torch.linalg.lstsq(A.T, B.T, driver="gelsd").solution.T
    assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()) + 1e-9)
    assert sorted(me.touched) == [me.weight_name(1), me.weight_name(2)]


def test_emmet_single_request_equals_rome(tokenizer, cache):
    from lit_edit.editors import ROME

    common = dict(layers=[1], statistics=dict(update_weight=1.0))
    ro = _editor(ROME, tokenizer, cache, values=dict(weight_decay=0.5, clamp_norm_factor=4.0), **common)
    w0 = ro.weight(1).detach().clone()
    groups = ro.context_templates()
    from lit_edit.closed_form import emmet_solve, keys_at, mlp_out_module, rome_solve

    k = keys_at(ro.model, tokenizer, REQUESTS[:1], 1, groups)[0]
    v = mlp_out_module(ro.model, 1)(k).detach() + 0.3
    C = ro.key_statistics(1)
    d_rome = rome_solve(k, v - w0 @ k, C)
    d_emmet, _ = emmet_solve(k[:, None], (v - w0 @ k)[:, None], C, 1.0, 0.0)
    assert torch.allclose(d_rome, d_emmet, atol=1e-8)


def test_accumulate_false_restores_after_batch(tokenizer, cache):
    import lightning as L

    from lit_edit.editors import MEMIT

    ed = _editor(MEMIT, tokenizer, cache, layers=[1, 2], accumulate=False)
    before = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(sorted(module.touched))

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[Probe()], accelerator="cpu")
    trainer.fit(ed, train_dataloaders=torch.utils.data.DataLoader(REQUESTS, batch_size=2, collate_fn=list))
    assert seen == [[ed.weight_name(1), ed.weight_name(2)]] * 2
    assert all(torch.equal(p, before[n]) for n, p in ed.model.named_parameters())
    assert "edit/v_loss" in trainer.callback_metrics and "edit/update_norm" in trainer.callback_metrics


# --------------------------------------------------------------------------- statistics


def test_stats_cache_keyed_by_every_field(tokenizer, cache, caplog):
    import logging

    from lit_edit.stats import second_moment

    model = _llama(tokenizer)
    corpus = write_corpus(cache)
    base = dict(corpus=corpus, n_samples=20, max_length=32, batch_size=8)
    with caplog.at_level(logging.INFO, logger="lit_edit.stats"):
        first = second_moment(model, tokenizer, 1, **base)
        again = second_moment(model, tokenizer, 1, **base)
    assert not first.cached and again.cached and torch.equal(first.mom2, again.mom2)
    assert "reusing cached statistics" in caplog.text
    # reference: E[k kᵀ] over all non-padding tokens
    ks = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: ks.append(a[0][0]))
    from lit_edit.data.corpus import load_texts

    for t in load_texts(corpus, limit=20):
        model(**tokenizer(t, return_tensors="pt", truncation=True, max_length=32))
    h.remove()
    k = torch.cat(ks).double()
    assert torch.allclose(first.mom2, k.T @ k / k.shape[0], atol=1e-6)
    assert first.count == k.shape[0]
    changes = [
        dict(layer=2),
        dict(module="mlp.up_proj"),
        dict(n_samples=10),
        dict(max_length=16),
        dict(dtype="float32"),
        dict(model_name="other-model"),
        dict(revision="abc123"),
    ]
    keys = {first.key.digest()}
    for change in changes:
        args = {**base, **change}
        layer = args.pop("layer", 1)
        got = second_moment(model, tokenizer, layer, **args)
        assert not got.cached, change
        keys.add(got.key.digest())
    other = Path(cache) / "corpus2.txt"
    other.write_text(Path(corpus).read_text() + "\nextra line of text")
    got = second_moment(model, tokenizer, 1, **{**base, "corpus": str(other)})
    assert not got.cached
    keys.add(got.key.digest())
    assert len(keys) == len(changes) + 2
    # editing the corpus file in place changes its version: the old cache is not reused
    Path(corpus).write_text(Path(corpus).read_text() + "\nnew text")
    assert not second_moment(model, tokenizer, 1, **base).cached


def test_gpt2_stats_input_dim(tokenizer, cache):
    from lit_edit.stats import second_moment

    sm = second_moment(_gpt2(tokenizer), tokenizer, 0, corpus=write_corpus(cache), n_samples=5, max_length=16)
    assert sm.mom2.shape == (256, 256)


def test_context_templates_cached_on_disk(tokenizer, cache):
    from lit_edit.closed_form import ContextTemplates, TemplateSpec

    model = _llama(tokenizer)
    spec = TemplateSpec(groups=((3, 2), (4, 2)))
    a = ContextTemplates().get(model, tokenizer, spec, seed=3)
    assert a[0] == ["{}"] and [len(g) for g in a] == [1, 2, 2] and all(t.endswith(". {}") for t in a[1])
    files = list((Path(cache) / "templates").glob("*.json"))
    assert len(files) == 1
    assert ContextTemplates().get(model, tokenizer, spec, seed=3) == a  # from disk
    ContextTemplates().get(model, tokenizer, spec, seed=4)
    assert len(list((Path(cache) / "templates").glob("*.json"))) == 2


# --------------------------------------------------------------------------- stop-aware target (issue 15)

STOP_TEMPLATES = ["{}", "Hello there. {}"]
#: ``optimize_values`` on ``make_tiny_llama`` for REQUESTS[0] and REQUESTS[3] (layer 1, mlp_out,
#: STOP_TEMPLATES, steps=3, loss_tol=0), computed with the code before ``values.stop`` existed.
BEFORE_STOP = {
    "nll": [10.8346529006958, 11.032617568969727],
    "loss": [146.14605712890625, 92.08576202392578],
    "delta_norm": [0.05912290345512639, 0.09870083967018238],
}


def test_stop_eos_rows_cover_eos_after_target(tokenizer):
    from lit_edit.closed_form import encode_in_template
    from lit_edit.closed_form.values import _Rows
    from lit_edit.data.tokenize import encode_target

    reqs = [REQUESTS[0], REQUESTS[3]]
    off = _Rows(tokenizer, reqs, STOP_TEMPLATES, "{} is a")
    on = _Rows(tokenizer, reqs, STOP_TEMPLATES, "{} is a", stop="eos")
    eos = tokenizer.eos_token_id
    assert on.n_rewrite == off.n_rewrite == 4
    for row in range(on.n_rewrite):
        r = reqs[row // len(STOP_TEMPLATES)]
        target = encode_target(tokenizer, r.target_new)
        plen = encode_in_template(tokenizer, r, STOP_TEMPLATES[row % len(STOP_TEMPLATES)]).prompt_length
        sel = on.tgt_row == row
        # labels: every target token, then EOS; positions: the logits that predict them (teacher forcing)
        assert on.tgt_tok[sel].tolist() == target + [eos]
        assert on.tgt_col[sel].tolist() == list(range(plen - 1, plen + len(target)))
        assert int(on.tgt_count[row]) == len(target) + 1
        # the row holds the whole target (its last token now predicts EOS) and nothing after it
        assert on.ids[row, plen : plen + len(target)].tolist() == target
        assert int(on.mask[row].sum()) == plen + len(target)
        assert off.tgt_tok[off.tgt_row == row].tolist() == target
    # the KL rows are untouched by the option
    assert torch.equal(on.fact[on.n_rewrite:], off.fact[off.n_rewrite:])


def test_stop_string_tokenized_as_continuation(tokenizer):
    from lit_edit.closed_form import encode_in_template, stop_token_ids
    from lit_edit.data.tokenize import encode_target

    r = REQUESTS[3]
    target = encode_target(tokenizer, r.target_new)
    for stop in (".", "\n"):
        ids = stop_token_ids(tokenizer, r.target_new, stop)
        assert ids and tokenizer.decode(target + ids) == " Microsoft Windows" + stop
        e = encode_in_template(tokenizer, r, with_target=True, stop=stop)
        assert e.target_ids == target + ids
        assert e.ids[e.prompt_length :] == (target + ids)[:-1]
    assert stop_token_ids(tokenizer, r.target_new, "eos") == [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="stop"):
        stop_token_ids(tokenizer, r.target_new, "")


@pytest.mark.parametrize("partial", [True, False])
def test_stop_eos_step0_nll_is_hand_computed_target_plus_eos_nll(tokenizer, partial):
    from helpers import make_tiny_llama

    from lit_edit.closed_form import ValueSettings, optimize_values
    from lit_edit.data.tokenize import encode_prompt, encode_target

    model = make_tiny_llama(len(tokenizer))
    reqs = [REQUESTS[0], REQUESTS[3]]
    # steps=1: the loss is evaluated once at δ = 0 and no step is taken
    got = optimize_values(model, tokenizer, reqs, 1, "mlp_out", STOP_TEMPLATES, ValueSettings(steps=1, stop="eos"),
                          partial=partial)
    assert (got.steps == 0).all() and (got.delta == 0).all()
    expected = []
    with torch.no_grad():
        for r in reqs:
            per_template = []
            for t in STOP_TEMPLATES:
                prompt = encode_prompt(tokenizer, t.replace("{}", r.prompt))
                labels = encode_target(tokenizer, r.target_new) + [tokenizer.eos_token_id]
                ids = torch.tensor([prompt + labels])
                logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
                nll = [-logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(labels)]
                per_template.append(torch.stack(nll).mean())
            expected.append(torch.stack(per_template).mean())
    assert torch.allclose(got.nll.double(), torch.stack(expected), atol=1e-4, rtol=1e-5)
    off = optimize_values(model, tokenizer, reqs, 1, "mlp_out", STOP_TEMPLATES, ValueSettings(steps=1), partial=partial)
    assert not torch.allclose(off.nll, got.nll)  # the EOS term changes the loss


def test_stop_off_is_bit_identical_to_default_and_to_before(tokenizer):
    from helpers import make_tiny_llama

    from lit_edit.closed_form import ValueSettings, optimize_values
    from lit_edit.closed_form.values import _Rows

    reqs = [REQUESTS[0], REQUESTS[3]]
    plain = _Rows(tokenizer, reqs, STOP_TEMPLATES, "{} is a")
    off = _Rows(tokenizer, reqs, STOP_TEMPLATES, "{} is a", stop=None)
    for f in ("ids", "mask", "fact", "owner", "tgt_row", "tgt_col", "tgt_tok", "tgt_count"):
        assert torch.equal(getattr(plain, f), getattr(off, f)), f
    assert ValueSettings().stop is None
    model = make_tiny_llama(len(tokenizer))
    default = optimize_values(model, tokenizer, reqs, 1, "mlp_out", STOP_TEMPLATES, ValueSettings(steps=3, loss_tol=0.0))
    explicit = optimize_values(model, tokenizer, reqs, 1, "mlp_out", STOP_TEMPLATES,
                               ValueSettings(steps=3, loss_tol=0.0, stop=None))
    for f in ("target", "initial", "delta", "loss", "nll", "steps"):
        assert torch.equal(getattr(default, f), getattr(explicit, f)), f
    # the stored expectation from the code before the option (tolerance only for other BLAS builds)
    close = dict(rtol=1e-5, atol=1e-7)
    assert torch.allclose(default.nll.double(), torch.tensor(BEFORE_STOP["nll"], dtype=torch.float64), **close)
    assert torch.allclose(default.loss.double(), torch.tensor(BEFORE_STOP["loss"], dtype=torch.float64), **close)
    d = default.delta.double()
    # The norm, not the entries' signs: three Adam steps move every entry by about ±lr whatever its
    # gradient's size, so an entry whose gradient is near 0 takes the sign that the CPU's float
    # kernels give it, and a signed sum of the entries differs between machines.
    assert torch.allclose(d.norm(dim=1), torch.tensor(BEFORE_STOP["delta_norm"], dtype=torch.float64), **close)
    assert default.steps.tolist() == [2, 2]


def test_value_options_stop_validated_recorded_and_threaded(tokenizer, tmp_path):
    from lit_edit.editors import MEMIT, ROME
    from lit_edit.editors.closed_form import ValueOptions

    with pytest.raises(ValueError, match="values.stop"):
        ValueOptions(stop="")
    with pytest.raises(TypeError, match="values.stop"):
        ValueOptions(stop=3)
    assert ValueOptions().stop is None
    for cls in (ROME, MEMIT):
        ed = _editor(cls, tokenizer, tmp_path, values={"stop": "eos"})
        assert ed.hparams["values"]["stop"] == "eos"
        assert ed.value_settings().stop == "eos"
        assert _editor(cls, tokenizer, tmp_path).value_settings().stop is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["mlp_out", "block"])
def test_prefix_cache_gives_the_vectors_of_whole_rows(tokenizer, arch, site):
    """Steps that run only from the fact token on (the prefix's keys and values recorded once)
    give the vectors, losses and step counts of steps over whole rows, and the runner really
    left columns out."""
    from lit_edit.closed_form import ValueSettings, optimize_values
    from lit_edit.closed_form import values as V

    model = _llama(tokenizer) if arch == "llama" else _gpt2(tokenizer)
    templates = ["{}", "Once upon a time. {}", "In a long and winding story about places and people. {}"]
    s = ValueSettings(steps=4, loss_tol=0.0)
    skipped = []
    real_prepare = V._Runner.prepare

    def spy(self, ids, mask, fact):
        out = real_prepare(self, ids, mask, fact)
        skipped.append(self.skip)
        return out

    V._Runner.prepare = spy
    try:
        cached = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s)
    finally:
        V._Runner.prepare = real_prepare
    whole = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s, prefix_cache=False)
    full = optimize_values(model, tokenizer, REQUESTS[:3], 1, site, templates, s, partial=False, group_rows=False)
    for other in (whole, full):
        torch.testing.assert_close(cached.target, other.target, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.loss, other.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(cached.steps, other.steps)
    assert (cached.delta.norm(dim=1) > 0).all()
    if arch == "llama":
        assert sum(skipped) > 0  # the steps did leave the prefix columns out


def test_span_groups_cover_every_row_once_and_beat_one_batch():
    from lit_edit.closed_form.values import span_groups

    starts = [0, 0, 5, 5, 5, 12, 12, 3]
    ends = [4, 6, 9, 9, 10, 20, 21, 30]
    groups = span_groups(starts, ends, overhead=2)
    assert sorted(i for g in groups for i in g) == list(range(len(starts)))

    def cost(gs):
        return sum(len(g) * (max(ends[i] for i in g) - min(starts[i] for i in g)) + 2 for g in gs)

    assert cost(groups) < cost([list(range(len(starts)))])
    assert span_groups([0, 0], [5, 5]) == [[0, 1]]
    # with no overhead every distinct span is its own sub-batch
    assert len(span_groups(starts, ends, overhead=0)) == len(set(zip(starts, ends)))
