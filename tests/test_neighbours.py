"""Relation-neighbour preservation and the LocFT-BF budget extension, on tiny random models."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data import EditDataModule, EditRequest
from lit_edit.editors import LocFTBF
from lit_edit.neighbours import (
    NeighbourKeys,
    RelationNeighbours,
    SubjectIndex,
    build_targets,
    neighbour_kl,
    perturbed_subjects,
    relation_prompts,
    subject_words,
)

DOWN1 = "model.layers.1.mlp.down_proj.weight"
OTHERS = ["Marie Curie", "Mount Fuji", "The Beatles", "Lake Victoria", "Albert Einstein", "Berlin Wall", "Nile", "Mozart"]


@pytest.fixture
def subjects_file(tmp_path):
    path = tmp_path / "subjects.txt"
    path.write_text("\n".join(OTHERS) + "\n\n")
    return str(path)


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def editor(model, tok, **kw):
    kw.setdefault("target_modules", ["mlp.down_proj"])
    kw.setdefault("layers_to_transform", [1])
    kw.setdefault("lr", 1e-2)
    kw.setdefault("min_loss", 0.0)
    return LocFTBF(model=model, tokenizer=tok, **kw)


def fit(ed, requests, epochs, batch_size=100, round_size=None):
    trainer(max_epochs=epochs).fit(ed, datamodule=EditDataModule(requests=list(requests), batch_size=batch_size))
    return ed


# --------------------------------------------------------------------------- prompts


def test_relation_prompts_swap_the_subject_deterministically(requests):
    r = requests[0]
    got = relation_prompts(r, OTHERS, 3, seed=0)
    assert len(got) == 3 and len(set(got)) == 3
    assert all("Eiffel Tower" not in p and p.endswith("is located in the city of") for p in got)
    assert all(any(p == f"The {o} is located in the city of" for o in OTHERS) for p in got)
    assert relation_prompts(r, OTHERS, 3, seed=0) == got  # same request, same neighbours
    assert relation_prompts(r, OTHERS, 3, seed=1) != got or len(OTHERS) < 4
    assert relation_prompts(r, ["Eiffel Tower", "Nile"], 3) == ["The Nile is located in the city of"]  # never itself
    no_subject = EditRequest(prompt="Apple was founded by", target_new="Bill Gates")
    assert relation_prompts(no_subject, OTHERS, 3) == []


def test_relation_prompts_never_use_the_same_entity(requests):
    r = requests[2]  # subject "Apple"
    got = relation_prompts(r, ["Apple Inc.", "apple", "Pineapple", "Nile"], 4)
    assert got == ["Nile was founded by"]


def test_similar_choice_takes_the_nearest_subjects_first(tiny_llama, tokenizer, requests):
    r = requests[0]  # "Eiffel Tower"
    candidates = OTHERS + ["Tower Eiffel"]  # the same tokens in another order: the same mean embedding
    index = SubjectIndex(tiny_llama, tokenizer, candidates)
    order = index.nearest(r.subject, 5)
    assert order[0] == len(candidates) - 1
    assert relation_prompts(r, candidates, 2, order=order)[0] == "The Tower Eiffel is located in the city of"
    similar = RelationNeighbours(candidates, prompts=2, tokens=1, choice="similar")
    similar.fill(tiny_llama, tokenizer, [r])
    first = similar._targets[(r.prompt, r.subject, r.target_new)].rows[0]
    assert first == tokenizer("The Tower Eiffel is located in the city of")["input_ids"]
    with pytest.raises(ValueError, match="neighbour_choice"):
        RelationNeighbours(candidates, prompts=2, tokens=1, choice="nearest")


# --------------------------------------------------------------------------- the KL term


def next_token_logp(model, tok, prompt):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1].float().log_softmax(-1)


def test_neighbour_kl_is_zero_unedited_and_a_lower_bound_of_the_full_kl(tiny_llama, tokenizer):
    prompts = ["The Nile is located in the city of", "Mozart was founded by"]
    assert build_targets(tiny_llama, tokenizer, prompts, tokens=3).top_ids.shape[0] == 2 * 3
    target = tokenizer(" Rome city", add_special_tokens=False)["input_ids"]
    both = build_targets(tiny_llama, tokenizer, prompts, tokens=3, target=target)
    assert both.top_ids.shape[0] == 2 * 2 + 2 * len(target)  # the prompts' last position once
    targets = build_targets(tiny_llama, tokenizer, prompts, tokens=1)
    assert float(neighbour_kl(tiny_llama, tokenizer, [targets]).detach()) == pytest.approx(0.0, abs=1e-5)
    before = [next_token_logp(tiny_llama, tokenizer, p) for p in prompts]
    with torch.no_grad():
        w = dict(tiny_llama.named_parameters())[DOWN1]
        torch.manual_seed(0)
        w.add_(0.5 * torch.randn_like(w))
    coarse = float(neighbour_kl(tiny_llama, tokenizer, [targets]).detach())
    after = [next_token_logp(tiny_llama, tokenizer, p) for p in prompts]
    exact = sum(float((b.exp() * (b - a)).sum()) for b, a in zip(before, after)) / len(prompts)
    assert 1e-6 < coarse <= exact + 1e-6, (coarse, exact)  # a random model's top tokens hold little mass


def test_neighbour_term_keeps_other_subjects_while_editing(tokenizer, requests, subjects_file, monkeypatch):
    # a random model's next-token distribution is nearly flat: keep all of it, not only the top tokens
    monkeypatch.setattr("lit_edit.neighbours.TOP_TOKENS", len(tokenizer) - 1)
    probes = [p for r in requests for p in relation_prompts(r, OTHERS, 4, seed=0)]
    drift = {}
    for weight in (0.0, 30.0):
        model = make_tiny_llama(len(tokenizer))
        reference = build_targets(model, tokenizer, probes, tokens=1, top=len(tokenizer) - 1)  # the full KL
        ed = editor(model, tokenizer, neighbour_kl=weight, neighbour_prompts=4, neighbour_subjects=subjects_file)
        loss0 = ed.edit_loss(requests).detach()
        fit(ed, requests, epochs=10)
        loss1 = ed.edit_loss(requests).detach()
        assert (loss1 < loss0 - 0.2).all(), (weight, loss0, loss1)  # the edits are still learned
        drift[weight] = float(neighbour_kl(model, tokenizer, [reference]).detach())
        assert (ed.neighbours is None) == (weight == 0.0)
        if weight:
            assert len(ed.neighbours) == len(requests)
    assert drift[30.0] < 0.5 * drift[0.0], drift


def test_neighbour_targets_come_from_the_unedited_weights(tiny_llama, tokenizer, requests, subjects_file):
    """Targets filled mid-fit (a request first seen after some steps) still describe the unedited model."""
    ed = editor(tiny_llama, tokenizer, neighbour_kl=1.0, neighbour_subjects=subjects_file)
    fit(ed, requests[:2], epochs=3)  # edits the weights; the third request's neighbours are not filled yet
    late = requests[2]
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    ed.prepare_neighbours()
    ed.fill_neighbours([late])
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())  # the current weights are back
    fresh = make_tiny_llama(len(tokenizer))
    prompts = relation_prompts(late, ed.neighbours.subjects, ed.neighbours.prompts)
    expected = build_targets(fresh, tokenizer, prompts, tokens=1)
    got = ed.neighbours._targets[(late.prompt, late.subject, late.target_new)]
    assert torch.equal(got.top_ids, expected.top_ids)
    assert torch.allclose(got.top_logp, expected.top_logp, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"neighbour_kl": -1.0}, ValueError, "neighbour_kl must be >= 0"),
        ({"neighbour_kl": 1.0, "lora_rank": 4}, ValueError, "neighbour_kl .* lora_rank"),
        ({"neighbour_rise": -1.0}, ValueError, "neighbour_rise must be >= 0"),
        ({"neighbour_rise": 1.0, "lora_rank": 4}, ValueError, "neighbour_rise .* lora_rank"),
        ({"neighbour_keys": -1.0}, ValueError, "neighbour_keys must be >= 0"),
        ({"neighbour_keys": 1.0, "lora_rank": 4}, ValueError, "neighbour_keys .* lora_rank"),
        ({"neighbour_keys_own": True}, ValueError, "neighbour_keys_own must be one of"),
        ({"neighbour_prompts": 0}, ValueError, "neighbour_prompts must be >= 1"),
        ({"neighbour_tokens": 0}, ValueError, "neighbour_tokens must be >= 1"),
        ({"neighbour_subjects": "wiki:test"}, ValueError, "neighbour_subjects"),
        ({"neighbour_subjects": "/no/such/subjects.txt"}, ValueError, "neighbour_subjects"),
        ({"neighbour_choice": "nearest"}, ValueError, "neighbour_choice must be one of"),
        ({"neighbour_choice": "perturb"}, ValueError, "neighbour_choice must be one of"),
        ({"neighbour_target": "yes"}, TypeError, "neighbour_target"),
        ({"extend_epochs": -1}, ValueError, "extend_epochs must be >= 0"),
        ({"extend_min_drop": 1.5}, ValueError, "extend_min_drop"),
        ({"extend_min_drop": -0.1}, ValueError, "extend_min_drop must be >= 0"),
    ],
)
def test_neighbour_and_extension_options_are_checked(tiny_llama, tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        editor(tiny_llama, tokenizer, **kwargs)


# --------------------------------------------------------------------------- budget extension


def test_extension_runs_past_max_epochs_only_while_the_loss_falls(tokenizer, requests):
    runs = {}
    for extend, drop in ((0, 0.05), (6, 0.0), (6, 0.99)):
        ed = editor(make_tiny_llama(len(tokenizer)), tokenizer, lr=3e-3, extend_epochs=extend, extend_min_drop=drop)
        fit(ed, requests, epochs=2)
        runs[(extend, drop)] = ed.round_history[-1]
    assert runs[(0, 0.05)]["epochs"] == 2
    assert runs[(6, 0.0)]["epochs"] == 8  # the loss keeps falling: every extra epoch is used
    assert runs[(6, 0.99)]["epochs"] == 2  # no epoch falls by 99%: stops at max_epochs
    assert runs[(6, 0.0)]["loss"] < runs[(0, 0.05)]["loss"]


def test_extension_stops_at_min_loss_and_applies_per_round(tokenizer, requests):
    ed = editor(make_tiny_llama(len(tokenizer)), tokenizer, lr=3e-3, extend_epochs=6, extend_min_drop=0.0)
    reached = fit(ed, requests, epochs=2).round_history[-1]["loss"]  # after 8 epochs
    ed = editor(make_tiny_llama(len(tokenizer)), tokenizer, lr=3e-3, min_loss=reached + 1e-4, extend_epochs=30, extend_min_drop=0.0)
    h = fit(ed, requests, epochs=2).round_history[-1]
    assert h["stopped"] == "min_loss" and 2 < h["epochs"] <= 8, h
    ed = editor(make_tiny_llama(len(tokenizer)), tokenizer, lr=3e-3, round_size=2, extend_epochs=3, extend_min_drop=0.0)
    fit(ed, requests, epochs=2)
    assert [h["epochs"] for h in ed.round_history] == [5, 5]


def test_neighbour_target_keeps_the_distributions_along_the_new_answer(tokenizer, requests, subjects_file, monkeypatch):
    monkeypatch.setattr("lit_edit.neighbours.TOP_TOKENS", len(tokenizer) - 1)
    drift = {}
    for on_target in (False, True):
        model = make_tiny_llama(len(tokenizer))
        along = [  # the full KL at every position of each request's new target after its neighbour prompts
            build_targets(model, tokenizer, relation_prompts(r, OTHERS, 4, seed=0), tokens=1, top=len(tokenizer) - 1,
                          target=tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"])
            for r in requests
        ]
        ed = editor(model, tokenizer, neighbour_kl=300.0, neighbour_subjects=subjects_file, neighbour_target=on_target)
        loss0 = ed.edit_loss(requests).detach()
        fit(ed, requests, epochs=10)
        assert (ed.edit_loss(requests).detach() < loss0 - 0.2).all()  # the edits are still learned
        drift[on_target] = float(neighbour_kl(model, tokenizer, along).detach())
    assert drift[True] < 0.7 * drift[False], drift


# --------------------------------------------------------------------------- the target-rise term


def target_nll(model, tok, prompt, target):
    """Mean token NLL of `` target`` teacher forced after ``prompt``, by hand."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + t])).logits[0].float().log_softmax(-1)
    return -sum(float(logp[len(p) + i - 1, tok_id]) for i, tok_id in enumerate(t)) / len(t)


def test_neighbour_rise_is_the_hinge_of_the_new_target_over_the_unedited_model(tiny_llama, tokenizer, requests):
    from lit_edit.neighbours import NeighbourRise

    rise = NeighbourRise(RelationNeighbours(OTHERS, 3, 1))
    assert rise.missing(requests) == requests
    rise.fill(tiny_llama, tokenizer, requests)
    assert rise.missing(requests) == [] and len(rise) == 3
    before = {(r.case_id, p): target_nll(tiny_llama, tokenizer, p, r.target_new)
              for r in requests for p in relation_prompts(r, OTHERS, 3, seed=0)}
    assert float(rise.loss(tiny_llama, tokenizer, requests)) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        w = dict(tiny_llama.named_parameters())[DOWN1]
        torch.manual_seed(0)
        w.add_(0.5 * torch.randn_like(w))
    hinge = [max(0.0, b - target_nll(tiny_llama, tokenizer, p, r)) for (r, p), b in
             (((next(q.target_new for q in requests if q.case_id == c), p), b) for (c, p), b in before.items())]
    assert 0 < sum(h > 0 for h in hinge) < len(hinge)  # some rose, some fell: only the rises count
    assert float(rise.loss(tiny_llama, tokenizer, requests)) == pytest.approx(sum(hinge) / len(hinge), rel=1e-4, abs=1e-6)
    assert rise.loss(tiny_llama, tokenizer, [EditRequest(prompt="Apple was founded by", target_new="X")]) is None


def test_neighbour_rise_holds_the_new_target_down_for_other_subjects(tokenizer, requests, subjects_file):
    probes = [(p, r.target_new) for r in requests for p in relation_prompts(r, OTHERS, 4, seed=0)]
    rose = {}
    for weight in (0.0, 1.0):
        model = make_tiny_llama(len(tokenizer))
        before = [target_nll(model, tokenizer, p, t) for p, t in probes]
        ed = editor(model, tokenizer, neighbour_rise=weight, neighbour_subjects=subjects_file)
        loss0 = ed.edit_loss(requests).detach()
        fit(ed, requests, epochs=10)
        assert (ed.edit_loss(requests).detach() < loss0 - 0.2).all()  # the edits are still learned
        assert (ed.neighbour_rise is None) == (weight == 0.0)
        rose[weight] = sum(b - target_nll(model, tokenizer, p, t) for (p, t), b in zip(probes, before)) / len(probes)
    assert rose[0.0] > 0.5 and rose[1.0] < 0.3 * rose[0.0], rose


# --------------------------------------------------------------------------- key-level neighbour term


def neighbour_rows(tok, requests, prompts_per_request=4):
    """Each request's neighbour prompts followed by its new target but the last token."""
    from lit_edit.data.tokenize import encode_prompt, encode_target

    return [
        (encode_prompt(tok, p) + encode_target(tok, r.target_new))[:-1]
        for r in requests
        for p in relation_prompts(r, OTHERS, prompts_per_request, seed=0)
    ]


def module_outputs(model, tok, rows, module):
    """The outputs of ``module`` at every real position of ``rows`` (right padded)."""
    from lit_edit.data.tokenize import pad_rows

    got = []
    handle = module.register_forward_hook(lambda m, a, out: got.append(out.detach()))
    try:
        ids, mask = pad_rows(rows, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return got[0][mask.bool()]


def test_neighbour_keys_term_is_the_relative_change_of_the_module_outputs(tiny_llama, tokenizer, requests, subjects_file):
    """The penalty equals ‖ΔW K‖² / ‖W₀ K‖² over every position of the neighbour rows, measured by
    running those rows through the edited and the unedited model (only that module tuned)."""
    ed = editor(tiny_llama, tokenizer, neighbour_keys=1.0, neighbour_subjects=subjects_file)
    module = tiny_llama.model.layers[1].mlp.down_proj
    rows = neighbour_rows(tokenizer, requests)
    before = module_outputs(tiny_llama, tokenizer, rows, module)
    fit(ed, requests, epochs=3)  # fills the keys of every request's neighbours, then edits the weight
    assert len(ed.neighbour_keys) == sum(len(r) for r in rows)
    after = module_outputs(tiny_llama, tokenizer, rows, module)
    assert not torch.allclose(before, after)
    expected = ((after - before) ** 2).sum() / (before**2).sum()
    w = dict(tiny_llama.named_parameters())[DOWN1]
    got = ed.neighbour_keys.loss({DOWN1: w}, {DOWN1: ed._originals[DOWN1]})
    assert torch.allclose(got, expected, rtol=1e-4), (float(got), float(expected))


def test_neighbour_keys_keep_other_subjects_while_editing(tokenizer, requests, subjects_file):
    rows = neighbour_rows(tokenizer, requests)
    change = {}
    for weight in (0.0, 1.0):
        model = make_tiny_llama(len(tokenizer))
        module = model.model.layers[1].mlp.down_proj
        before = module_outputs(model, tokenizer, rows, module)
        ed = editor(model, tokenizer, neighbour_keys=weight, neighbour_subjects=subjects_file)
        loss0 = ed.edit_loss(requests).detach()
        fit(ed, requests, epochs=10)
        loss1 = ed.edit_loss(requests).detach()
        assert (loss1 < loss0 - 0.2).all(), (weight, loss0, loss1)  # the edits are still learned
        assert (ed.neighbour_keys is None) == (weight == 0.0)
        after = module_outputs(model, tokenizer, rows, module)
        change[weight] = float(((after - before) ** 2).sum() / (before**2).sum())
    assert change[1.0] < 0.2 * change[0.0], change


def test_neighbour_keys_are_read_from_the_unedited_weights(tiny_llama, tokenizer, requests, subjects_file):
    """Keys read mid-fit (a request first seen after some steps, with a lower tuned block) are the
    unedited model's, and the current weights are back afterwards."""
    ed = editor(tiny_llama, tokenizer, neighbour_keys=1.0, neighbour_subjects=subjects_file,
                target_modules=["mlp.down_proj"], layers_to_transform=[0, 1])
    fit(ed, requests[:2], epochs=3)  # block 0 changes: block 1's inputs would differ under the edited weights
    late = requests[2]
    now = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    ed.prepare_neighbours()
    ed.fill_neighbours([late])
    assert all(torch.equal(p, now[n]) for n, p in tiny_llama.named_parameters())
    fresh = make_tiny_llama(len(tokenizer))
    rows = neighbour_rows(tokenizer, [late])
    expected = NeighbourKeys(RelationNeighbours(OTHERS, 4, 1))
    expected.fill(fresh, tokenizer, [late], {DOWN1: fresh.model.layers[1].mlp.down_proj})
    assert len(ed.neighbour_keys) == len(expected) == sum(len(r) for r in rows)
    assert torch.allclose(ed.neighbour_keys._sums[DOWN1], expected._sums[DOWN1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("term", ["neighbour_kl", "neighbour_keys", "neighbour_rise"])
def test_neighbour_terms_fit_with_tuned_blocks_that_feed_each_other(tokenizer, requests, subjects_file, term):
    """With blocks 0 and 1 tuned, block 1's weight is saved for the backward pass: reading a new
    request's neighbours (original weights put back for a moment) must not happen while the
    step's graph holds the current ones."""
    model = make_tiny_llama(len(tokenizer))
    ed = editor(model, tokenizer, layers_to_transform=[0, 1], neighbour_subjects=subjects_file, **{term: 0.1})
    loss0 = ed.edit_loss(requests).detach()
    fit(ed, requests, epochs=4, batch_size=1)  # every request is new at some step
    assert (ed.edit_loss(requests).detach() < loss0).all()


def test_perturbed_subjects_differ_from_the_subject_in_one_word():
    pool = subject_words(OTHERS)
    assert "Fuji" in pool and "Mount" in pool
    variants = perturbed_subjects("10 Crown Terrace", pool, 6, seed=0)
    assert variants == perturbed_subjects("10 Crown Terrace", pool, 6, seed=0)  # deterministic
    assert len(variants) == len(set(variants)) == 6
    changed = set()
    for v in variants:
        diff = [i for i, (a, b) in enumerate(zip(v.split(), "10 Crown Terrace".split())) if a != b]
        assert len(v.split()) == 3 and len(diff) == 1 and v.split()[diff[0]] in pool, v
        changed.add(diff[0])
    assert changed == {0, 1, 2}  # every position of the name has a variant that differs there
    single = perturbed_subjects("Sugeldi", pool, 3, seed=0)
    assert len(single) == 3 and all(v.startswith("Suge") and v != "Sugeldi" for v in single), single
    assert perturbed_subjects("", pool, 3) == [] and perturbed_subjects("Nile", [], 3) == []


def test_perturbed_choice_fills_the_request_template(tiny_llama, tokenizer, requests):
    chooser = RelationNeighbours(OTHERS, prompts=3, tokens=1, choice="perturbed")
    r = requests[0]
    prompts = chooser.prompts_for(tiny_llama, tokenizer, r)
    expected = perturbed_subjects(r.subject, subject_words(OTHERS), 3)
    assert prompts == [r.prompt.replace(r.subject, v) for v in expected]


def test_neighbour_keys_own_read_the_request_outside_its_subject(tiny_llama, tokenizer, requests):
    """``own="subject"`` adds the request's own prompt and target at every position but the
    subject's tokens, and exactly those keys; ``"fact_token"`` every position but the last one."""
    from lit_edit.closed_form.tokens import fact_token_index
    from lit_edit.data.tokenize import encode_prompt, encode_target

    r = requests[0]
    module = {DOWN1: tiny_llama.model.layers[1].mlp.down_proj}
    plain = NeighbourKeys(RelationNeighbours(OTHERS, 2, 1))
    plain.fill(tiny_llama, tokenizer, [r], module)
    own = NeighbourKeys(RelationNeighbours(OTHERS, 2, 1), own="subject")
    own.fill(tiny_llama, tokenizer, [r], module)
    row = (encode_prompt(tokenizer, r.prompt) + encode_target(tokenizer, r.target_new))[:-1]
    at = r.prompt.find(r.subject)
    first = fact_token_index(tokenizer, r.prompt, at + 1)
    last = fact_token_index(tokenizer, r.prompt, at + len(r.subject))
    assert last > first  # "Eiffel Tower": more than one token, all of them left out
    kept = [i for i in range(len(row)) if not first <= i <= last]
    assert len(own) - len(plain) == len(kept)
    expected = module_inputs(tiny_llama, tokenizer, row, module[DOWN1])[kept].double()
    assert torch.allclose(own._sums[DOWN1] - plain._sums[DOWN1], expected.T @ expected, rtol=1e-6, atol=1e-8)
    fact = NeighbourKeys(RelationNeighbours(OTHERS, 2, 1), own="fact_token")
    fact.fill(tiny_llama, tokenizer, [r], module)
    assert len(fact) - len(plain) == len(row) - 1  # every position but the subject's last token


def module_inputs(model, tok, row, module):
    """The inputs of ``module`` at every position of one row."""
    got = []
    handle = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([row]))
    finally:
        handle.remove()
    return got[0][0]


def test_neighbour_keys_refuse_a_tensor_that_is_no_linear_weight_before_any_step(tiny_llama, tokenizer, requests, subjects_file):
    ed = editor(tiny_llama, tokenizer, target_modules=["input_layernorm"], neighbour_keys=1.0, neighbour_subjects=subjects_file)
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    with pytest.raises(ValueError, match="neighbour_keys need 2-D linear weights"):
        fit(ed, requests, epochs=1)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())


def _spill():
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("locality_spill", ROOT / "benchmarks" / "locality_spill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_locality_spill_groups_and_figures_match_hand_values():
    spill = _spill()
    prompt = "Who is the owner of Banavie railway station?"
    subject = "Banavie railway station"
    assert spill.classify(prompt, subject, "Who is the owner of Blanca railway station?") == "same template, shares a subject word"
    assert spill.classify(prompt, subject, "Who is the owner of Blanca?") == "same template, no shared word"
    assert spill.classify(prompt, subject, "Which company runs the station at Blanca?") == "other template, shares a subject word"
    assert spill.classify(prompt, subject, "Where did Louis de Cormontaigne pass away?") == "other template, no shared word"
    assert spill.classify(prompt, subject, prompt) == "same template, shares a subject word"  # the subject itself
    # mean token NLLs of the answer and the new target, before and after, for three prompts
    groups = ["same template, no shared word", "same template, no shared word", "other template, no shared word"]
    answer_before, target_before = [1.0, 2.0, 3.0], [2.0, 1.0, 5.0]  # answer wins on prompts 0 and 2
    answer_after, target_after = [1.5, 2.0, 1.0], [1.0, 0.5, 2.0]  # only prompt 2 still wins
    got = spill.summarize(groups, answer_before, target_before, answer_after, target_after)
    same = got["same template, no shared word"]
    assert same["prompts"] == 2 and same["NS_before"] == 50.0 and same["NS_after"] == 0.0
    assert same["margin_drop"] == pytest.approx(((1.0 - -0.5) + (-1.0 - -1.5)) / 2)  # (t0 - a0) - (t1 - a1)
    assert same["target_rise"] == pytest.approx((1.0 + 0.5) / 2)
    assert got["all"]["NS_before"] == pytest.approx(200 / 3) and got["all"]["NS_after"] == pytest.approx(100 / 3)
    assert "same template, shares a subject word" not in got  # empty groups are left out
    assert "| all | 3 | 66.7 → 33.3 |" in spill.table(got)


def test_perturbed_rise_with_writes_at_the_subject_is_warned(tiny_llama, tokenizer, subjects_file, caplog):
    import logging

    kw = {"neighbour_rise": 1.0, "neighbour_subjects": subjects_file, "layers_to_transform": [0]}
    with caplog.at_level(logging.WARNING, logger="lit_edit.editors.finetune"):
        editor(tiny_llama, tokenizer, write_positions="subject", neighbour_choice="random", **kw).prepare_neighbours()
        editor(tiny_llama, tokenizer, write_positions="all", neighbour_choice="perturbed", **kw).prepare_neighbours()
        assert "neighbour_choice=perturbed" not in caplog.text
        editor(tiny_llama, tokenizer, write_positions="subject", neighbour_choice="perturbed", **kw).prepare_neighbours()
    assert "neighbour_choice=perturbed and write_positions=subject" in caplog.text
