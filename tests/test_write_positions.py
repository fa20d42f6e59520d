"""``write_positions``: the edit loss's gradient reaches the tuned modules at the subject only."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.data import EditRequest
from lit_edit.data.request import RecordError
from lit_edit.data.tokenize import encode_prompt
from lit_edit.editors import LocFTBF
from lit_edit.editors.finetune import write_spans
from lit_edit.losses import ft_loss

GATE = "model.layers.1.mlp.gate_proj"


def test_write_spans_find_the_subject_tokens(tokenizer, requests):
    for r in requests:
        ids = encode_prompt(tokenizer, r.prompt)
        [(a, b)] = write_spans(tokenizer, r, "subject")
        assert tokenizer.decode(ids[a:b]).strip() == r.subject
        [(last, end)] = write_spans(tokenizer, r, "fact_token")
        assert (last, end) == (b - 1, b)
        assert r.subject.endswith(tokenizer.decode(ids[last:end]).strip())
        assert write_spans(tokenizer, r, "subject_answer") == [(a, b), (len(ids), None)]


def test_subject_tokens_inside_a_chat_template(tokenizer, requests):
    from lit_edit.closed_form.tokens import subject_tokens
    from lit_edit.data.chat import chat_format

    fmt = chat_format(tokenizer, "always")
    assert fmt.offset > 0
    for r in requests:
        ids = tokenizer(fmt.wrap(r.prompt), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        first, end = subject_tokens(tokenizer, r, fmt)
        assert tokenizer.decode(ids[first:end]).strip() == r.subject
        assert first > subject_tokens(tokenizer, r)[0]  # after the template's own tokens


def test_write_span_refuses_a_missing_subject(tokenizer):
    r = EditRequest(prompt="The capital of France is", subject="Germany", target_new="Lyon", case_id=7)
    with pytest.raises(RecordError, match="subject"):
        write_spans(tokenizer, r, "subject")
    with pytest.raises(ValueError, match="where must be"):
        write_spans(tokenizer, r, "all")


def _grad(model, tokenizer, requests, spans=None, modules=()):
    w = model.get_submodule(GATE).weight
    w.grad = None
    loss = ft_loss(model, tokenizer, requests, group_by_length=True, write_spans=spans, write_modules=modules)
    loss.mean().backward()
    return loss.detach(), w.grad.clone()


@pytest.mark.parametrize("where", ["subject", "subject_answer", "fact_token"])
def test_gradient_comes_from_the_span_only(tokenizer, requests, where):
    """The restricted gradient equals Σ_{t in span} g_t x_tᵀ of the unrestricted pass, and the
    loss values are the same."""
    model = make_tiny_llama(len(tokenizer), layers=3)  # block 1's subject positions reach the answer through block 2
    for p in model.parameters():
        p.requires_grad_(False)
    module = model.get_submodule(GATE)
    module.weight.requires_grad_(True)
    spans = [write_spans(tokenizer, r, where) for r in requests]

    # the unrestricted pass, with the module's inputs and the gradient at its outputs recorded
    seen: dict[str, list[torch.Tensor]] = {"x": [], "y": []}

    def keep(mod, args, out):
        out.retain_grad()
        seen["x"].append(args[0].detach())
        seen["y"].append(out)

    handle = module.register_forward_hook(keep)
    try:
        full, full_grad = _grad(model, tokenizer, requests)  # one batch: group_by_length keeps 3 short rows together
    finally:
        handle.remove()
    assert len(seen["x"]) == 1, "expected one sub-batch"
    x, g = seen["x"][0], seen["y"][0].grad
    expected = torch.zeros_like(full_grad)
    for b, ranges in enumerate(spans):
        for a, e in ranges:
            expected += g[b, a:e].T @ x[b, a:e]

    loss, grad = _grad(model, tokenizer, requests, spans, [module])
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad.abs().max() > 1e-4 * full_grad.abs().max()
    assert not torch.allclose(grad, full_grad, atol=1e-6)  # the other positions did contribute before
    # a span of None is every position
    _, every = _grad(model, tokenizer, requests, [None] * len(requests), [module])
    torch.testing.assert_close(every, full_grad, rtol=1e-5, atol=1e-7)


def _fit(ed, requests, epochs=10, **data):
    import lightning as L

    from lit_edit.data import EditDataModule

    data.setdefault("batch_size", 8)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_epochs=epochs).fit(ed, datamodule=EditDataModule(requests=requests, **data))


def test_locft_write_positions_edit_through_the_subject(tokenizer, requests):
    """A fit with write_positions='subject' lowers the edit loss of every request."""
    ed = LocFTBF(model=make_tiny_llama(len(tokenizer), layers=3), tokenizer=tokenizer, target_modules=["mlp.gate_proj"],
                 layers_to_transform=[1], lr=1e-2, min_loss=0.0, write_positions="subject")
    before = ft_loss(ed.model, tokenizer, requests).detach()
    _fit(ed, requests)
    after = ft_loss(ed.model, tokenizer, requests).detach()
    assert (after < before - 0.1).all(), (before, after)


def test_write_positions_refusals(tiny_llama, tokenizer, requests):
    with pytest.raises(ValueError, match="write_positions must be one of"):
        LocFTBF(model=tiny_llama, tokenizer=tokenizer, write_positions="target")
    # the last block's subject positions have no path to the answer: refused before any step
    ed = LocFTBF(model=tiny_llama, tokenizer=tokenizer, target_modules=["mlp.gate_proj"], layers_to_transform=[1],
                 lr=1e-2, min_loss=0.0, write_positions="fact_token")
    w0 = ed.model.get_submodule(GATE).weight.detach().clone()
    with pytest.raises(ValueError, match="not in a block below the last one"):
        _fit(ed, requests)
    assert torch.equal(ed.model.get_submodule(GATE).weight, w0)
    # a request without its subject in the prompt, last in the data: refused before the first step
    ed = LocFTBF(model=make_tiny_llama(len(tokenizer), layers=3), tokenizer=tokenizer, target_modules=["mlp.gate_proj"],
                 layers_to_transform=[1], lr=1e-2, min_loss=0.0, write_positions="subject")
    w0 = ed.model.get_submodule(GATE).weight.detach().clone()
    bad = EditRequest(prompt="Who founded the company?", target_new="Jobs", case_id="no-subject")
    with pytest.raises(RecordError, match="no-subject.*subject") as refused:
        _fit(ed, [*requests, bad], batch_size=1, shuffle=False)  # three steps would come before it
    assert refused.value.record == "no-subject" and "write_positions='all'" in str(refused.value)  # the way out
    assert torch.equal(ed.model.get_submodule(GATE).weight, w0)
