"""The ``chat_template`` option: raw prompts (never), the tokenizer's chat template (auto / always)."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from helpers import make_tiny_llama, write_corpus

from lit_edit.data import EditDataModule, EditRequest
from lit_edit.data.chat import chat_format, prompt_format, use_chat_template
from lit_edit.data.tokenize import encode_left_padded, encode_pairs, encode_prompt, encode_target

#: A small ChatML template without a default system message.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REQUEST = EditRequest(
    prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English",
    ground_truth="French", paraphrase_prompts=("Danielle Darrieux grew up speaking",), case_id=7,
)


@pytest.fixture
def chat_tok(tokenizer):
    """A copy of the SmolLM2 tokenizer whose chat template is :data:`CHATML`."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def plain_tok(tokenizer):
    """A copy of the SmolLM2 tokenizer without a chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"]


# --------------------------------------------------------------------------- tokenization


def test_never_gives_the_raw_ids_of_before_even_with_a_template(chat_tok):
    from lit_edit.closed_form import encode_in_template, fact_token_index

    raw_prompt = chat_tok(REQUEST.prompt, add_special_tokens=True)["input_ids"]
    raw_target = chat_tok(" English", add_special_tokens=False)["input_ids"]
    for fmt in (None, use_chat_template(chat_tok, "never")):
        assert encode_prompt(chat_tok, REQUEST.prompt, fmt) == raw_prompt
        assert encode_target(chat_tok, "English", fmt=fmt) == raw_target
        assert encode_target(chat_tok, "English", append_eos=True, fmt=fmt) == raw_target + [chat_tok.eos_token_id]
    batch = encode_pairs(chat_tok, [REQUEST.prompt], ["English"], append_eos=True)
    assert batch["input_ids"][0].tolist() == raw_prompt + raw_target + [chat_tok.eos_token_id]
    e = encode_in_template(chat_tok, REQUEST, "Hello there. {}", with_target=True)
    text = "Hello there. " + REQUEST.prompt
    assert e.ids == chat_tok(text, add_special_tokens=True)["input_ids"] + raw_target[:-1]
    assert e.fact_index == fact_token_index(chat_tok, text, text.index("Darrieux") + len("Darrieux"))


def test_auto_and_always_wrap_the_prompt_and_put_the_target_after_the_generation_prompt(chat_tok):
    for mode in ("auto", "always"):
        fmt = use_chat_template(chat_tok, mode)
        assert fmt.chat and fmt.mode == mode
        wrapped = chat_ids(chat_tok, REQUEST.prompt)
        assert encode_prompt(chat_tok, REQUEST.prompt) == wrapped  # exactly apply_chat_template's ids
        assert chat_tok.decode(wrapped).endswith(f"<|im_start|>user\n{REQUEST.prompt}<|im_end|>\n<|im_start|>assistant\n")
        target = encode_target(chat_tok, "English")
        assert target == chat_tok("English", add_special_tokens=False)["input_ids"]  # the reply, no leading space
        assert target != chat_tok(" English", add_special_tokens=False)["input_ids"]
        batch = encode_pairs(chat_tok, [REQUEST.prompt, "Hi"], ["English", "Rome"], append_eos=True)
        row, labels, plen = batch["input_ids"][0], batch["labels"][0], int(batch["prompt_lengths"][0])
        assert plen == len(wrapped) and row[:plen].tolist() == wrapped
        assert labels[:plen].eq(-100).all() and labels[plen:plen + len(target) + 1].tolist() == target + [chat_tok.eos_token_id]
        assert chat_tok.decode(row[: plen + len(target)]).endswith("<|im_start|>assistant\nEnglish")
        left = encode_left_padded(chat_tok, ["Hi", REQUEST.prompt])
        assert left["input_ids"][1].tolist() == wrapped and left["input_ids"][0, -len(chat_ids(chat_tok, "Hi")):].tolist() == chat_ids(chat_tok, "Hi")


def test_the_real_template_keeps_its_default_system_message(tokenizer):
    tok = copy.deepcopy(tokenizer)
    fmt = use_chat_template(tok, "auto")
    assert fmt.before.startswith("<|im_start|>system\n") and "SmolLM" in fmt.before
    assert encode_prompt(tok, REQUEST.prompt) == chat_ids(tok, REQUEST.prompt)
    assert prompt_format(tokenizer).chat is False  # the copy's format is its own


def test_stop_string_follows_the_reply_without_a_space(chat_tok):
    from lit_edit.closed_form import stop_token_ids

    use_chat_template(chat_tok, "auto")
    joint = chat_tok("English.", add_special_tokens=False)["input_ids"]
    assert stop_token_ids(chat_tok, "English", ".") == joint[len(encode_target(chat_tok, "English")):]
    assert stop_token_ids(chat_tok, "English", "eos") == [chat_tok.eos_token_id]


class _NoOffsets:
    """A tokenizer without offset mappings (the prefix rule of :func:`fact_token_index`)."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        kw.pop("return_offsets_mapping", None)
        return self.tok(text, **kw)


@pytest.mark.parametrize("context", ["{}", "Hello there. {}"])
def test_closed_form_fact_token_is_the_subjects_last_token_inside_the_chat(chat_tok, context):
    from lit_edit.closed_form import encode_in_template, fact_token_index

    fmt = use_chat_template(chat_tok, "auto")
    e = encode_in_template(chat_tok, REQUEST, context, with_target=True)
    user = context.replace("{}", REQUEST.prompt)
    wrapped = chat_ids(chat_tok, user)
    assert e.ids[: e.prompt_length] == wrapped and e.prompt_length == len(wrapped)
    assert e.target_ids == encode_target(chat_tok, "English")
    # the fact token holds the subject's last character, inside the user turn
    upto = chat_tok.decode(e.ids[: e.fact_index + 1])
    assert upto.endswith("Darrieux") and "<|im_start|>user\n" in upto
    assert e.fact_index == len(chat_tok(fmt.before, add_special_tokens=False)["input_ids"]) + len(
        chat_tok(context.partition("{}")[0] + "The mother tongue of Danielle Darrieux", add_special_tokens=False)["input_ids"]) - 1
    text = fmt.wrap(user)
    end = fmt.offset + user.index("Darrieux") + len("Darrieux")
    assert fact_token_index(_NoOffsets(chat_tok), text, end, add_special_tokens=False) == e.fact_index


def test_rome_reads_the_key_at_the_subject_inside_the_chat_and_writes_v_star(chat_tok, cache):
    from lit_edit.closed_form import keys_at, mlp_out_module
    from lit_edit.editors import ROME
    from lit_edit.editors.closed_form import StatisticsOptions, ValueOptions

    model = make_tiny_llama(len(chat_tok))
    ed = ROME(model=model, tokenizer=chat_tok, layers=1, chat_template="auto", values=ValueOptions(steps=3),
              statistics=StatisticsOptions(n_samples=40, max_length=32, batch_size=16, corpus=write_corpus(cache)))
    assert ed.hparams["chat_template"] == "auto" and ed.prompt_format.chat
    key = keys_at(ed.model, chat_tok, [REQUEST], 1)[0]
    ids = chat_ids(chat_tok, REQUEST.prompt)
    last = len(chat_tok(ed.prompt_format.before + "The mother tongue of Danielle Darrieux", add_special_tokens=False)["input_ids"]) - 1
    seen = {}

    def read_key(module, inputs, output):
        seen["k"] = inputs[0][0, last].detach()

    hook = mlp_out_module(ed.model, 1).register_forward_hook(read_key)
    with torch.no_grad():
        ed.model(input_ids=torch.tensor([ids]))
    hook.remove()
    assert torch.allclose(key, seen["k"].float(), atol=1e-5)
    diag = ed.edit([REQUEST])
    assert diag["residual"] < 1e-5 and diag["update_norm"] > 0


# --------------------------------------------------------------------------- the option


def test_always_without_a_template_is_an_error_naming_the_option(plain_tok, tokenizer):
    from lit_edit.editors import LocFTBF

    with pytest.raises(ValueError, match="chat_template='always'.*no chat template"):
        chat_format(plain_tok, "always")
    with pytest.raises(ValueError, match="chat_template='always'"):
        LocFTBF(model=make_tiny_llama(len(plain_tok)), tokenizer=plain_tok, chat_template="always")
    with pytest.raises(ValueError, match="chat_template must be one of auto, never, always"):
        LocFTBF(model=make_tiny_llama(len(plain_tok)), tokenizer=plain_tok, chat_template="yes")
    fmt = use_chat_template(plain_tok, "auto")  # auto without a template: raw text, bit for bit
    assert not fmt.chat and encode_prompt(plain_tok, REQUEST.prompt) == plain_tok(REQUEST.prompt)["input_ids"]
    assert encode_target(plain_tok, "English") == plain_tok(" English", add_special_tokens=False)["input_ids"]


def test_the_mode_is_in_the_summary_the_descriptions_and_the_unedited_cache_key(chat_tok, tokenizer, cache, tmp_path):
    from lit_edit.editors import LocFTBF
    from lit_edit.evaluation import EditEvaluation, Evaluator, UneditedCache

    summaries = {}
    for mode in ("never", "auto"):
        tok = copy.deepcopy(chat_tok)
        ed = LocFTBF(model=make_tiny_llama(len(tok)), tokenizer=tok, target_modules=["mlp.down_proj"],
                     layers_to_transform=[1], lr=1e-2, chat_template=mode)
        out = tmp_path / mode
        ev = EditEvaluation(protocols=["probability", "token_accuracy", "generation"], max_new_tokens=4,
                            print_table=False, summary_dir=str(out))
        dm = EditDataModule(requests=[REQUEST], batch_size=1)
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[ev]).fit(ed, datamodule=dm)
        summaries[mode] = json.loads((out / "summary.json").read_text())
        assert f"chat_template: {mode}" in ev.table().splitlines()[0]
    never, auto = summaries["never"], summaries["auto"]
    assert never["chat_template"] == {"mode": "never", "applied": False}
    assert auto["chat_template"]["mode"] == "auto" and auto["chat_template"]["applied"]
    assert auto["chat_template"]["after"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert "chat_template=auto" in auto["protocols"]["generation"] and "chat_template=never" in never["protocols"]["probability"]
    assert never["before"] != auto["before"]  # the unedited model scored other texts
    # the unedited-evaluation cache keeps the two formats apart; raw text keeps its key
    model, ev = make_tiny_llama(len(chat_tok)), Evaluator(protocols=["probability"])
    raw, wrapped = copy.deepcopy(chat_tok), copy.deepcopy(chat_tok)
    use_chat_template(wrapped, "auto")
    k_raw = UneditedCache.key(ev, model, [REQUEST], 0, 1, raw)
    k_chat = UneditedCache.key(ev, model, [REQUEST], 0, 1, wrapped)
    assert k_raw != k_chat and k_chat["chat_template"]["mode"] == "auto"
    assert k_raw == UneditedCache.key(ev, model, [REQUEST], 0, 1)


def test_the_length_check_counts_the_chat_wrapping(chat_tok):
    from lit_edit.data.datamodule import overlong_requests

    request = EditRequest(prompt=REQUEST.prompt, subject=REQUEST.subject, target_new="English", case_id=3)
    raw = len(chat_tok(REQUEST.prompt)["input_ids"]) + len(chat_tok(" English", add_special_tokens=False)["input_ids"]) + 1
    use_chat_template(chat_tok, "never")
    assert overlong_requests([request], chat_tok, raw) == []
    use_chat_template(chat_tok, "auto")
    (too_long,) = overlong_requests([request], chat_tok, raw)
    assert too_long.tokens == len(chat_ids(chat_tok, REQUEST.prompt)) + len(encode_target(chat_tok, "English")) + 1
