"""Property-based fuzzing of every entry point that reads user input: loaders, requests, constructors.

Each test feeds generated bad input (missing, mistyped, empty, huge, invisible, non-UTF-8,
deeply nested ...) and asserts that lit_edit either accepts it (and then every request is valid)
or refuses it with one of its clear errors (``RecordError``, ``ValueError``, ``TypeError``,
``FileNotFoundError``) whose message names the record and field, the option or the file; never
another exception (``KeyError``, ``IndexError``, ``AttributeError``, ``RecursionError``,
``UnicodeDecodeError`` ...). The generated inputs are counted; the last test asserts there were
at least 500 of them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import FIXTURE_FILES, make_tiny_llama, raw_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_edit.data import EditDataModule, EditRequest, PromptAnswer, RecordError, load_requests
from lit_edit.data.loaders import SCHEMAS
from lit_edit.editors.closed_form import StatisticsOptions, TemplateOptions, ValueOptions

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large], "derandomize": True, "database": None}

#: Generated inputs per test (test name -> (inputs, refused with a clear error)).
COUNTS: Counter = Counter()
REFUSED: Counter = Counter()
FUZZ_TESTS = 9  # the tests below that count inputs (the final check needs all of them to have run)

#: The error types lit_edit refuses input with. Subclasses of ValueError that are *not* clear
#: errors (a decoder's error escaping) are excluded explicitly.
CLEAR = (RecordError, ValueError, TypeError, FileNotFoundError)
UNCLEAR = (UnicodeError, json.JSONDecodeError)


def refused(test: str, error: BaseException, *names: str) -> None:
    """Count a refusal, after checking it is a clear error that names one of ``names``."""
    assert isinstance(error, CLEAR) and not isinstance(error, UNCLEAR), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    if isinstance(error, RecordError):
        assert message.startswith("record ") and error.field, message
        assert f"field {error.field!r}" in message, message
    else:
        assert any(n in message for n in names), f"{type(error).__name__}: {message!r} names none of {names}"
    REFUSED[test] += 1




# --------------------------------------------------------------------------- value strategies

INVISIBLE = ["\u200b", "\ufeff", "\u2060", "\u00ad", "\u200e", "\u3164", "\u2800", "\u180e", "\ufe0f", "\u034f"]
#: Texts no tokenizer should see: empty, blank, invisible only, lone surrogates, control characters.
bad_texts = st.one_of(
    st.sampled_from(["", " ", "\t\n", "\x00", "\x7f", "\r\n", "\ud800", "x\udfff", "\udc00y"]),
    st.lists(st.sampled_from(INVISIBLE + [" ", "\n"]), min_size=1, max_size=6).map("".join),
)
texts = st.one_of(
    bad_texts,
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.sampled_from(["Paris", "{}", "{} is in {}", "{0}", "{x:>9}", "}{", "The {} of", "Rome\u200b"]),
    st.integers(min_value=1, max_value=6).map(lambda k: "word " * (4_000 * k)),  # huge
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=8,
)
#: Every key of every schema, so that generated records look like records of some schema.
SCHEMA_KEYS = sorted(
    {"case_id", "id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality_prompt",
     "locality_ground_truth", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "src", "alt", "answers",
     "pred", "rephrase", "loc", "loc_ans", "update", "ans", "personas", "mhop", "mhop_ans", "locality", "portability"}
)


def _paths(value, prefix=()):
    """Every (nested) key path of a record."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_records(draw):
    """A fixture file of a random schema with 1-3 of its fields deleted or replaced by bad values."""
    schema = draw(st.sampled_from(sorted(FIXTURE_FILES)))
    recs = raw_records(schema)
    for _ in range(draw(st.integers(1, 3))):
        r = draw(st.integers(0, len(recs) - 1))
        paths = list(_paths(recs[r]))
        path = draw(st.sampled_from(paths)) if paths else ("prompt",)
        parent = recs[r]
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["set", "set", "set", "delete", "new_key"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "new_key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(SCHEMA_KEYS))] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
    if draw(st.booleans()):
        recs.insert(draw(st.integers(0, len(recs))), draw(json_values))  # a stray non-record or unknown record
    return schema, recs


def check_loaded(requests) -> None:
    """What a successful load must deliver: valid requests with unique usable ids."""
    assert requests and all(isinstance(r, EditRequest) for r in requests)
    ids = [r.case_id for r in requests if r.case_id is not None]
    assert len(ids) == len(set(ids))
    for r in requests:
        r.validate()
        assert isinstance(r.case_id, (int, str)) or r.case_id is None
        hash(r.case_id)


# --------------------------------------------------------------------------- loaders


@settings(max_examples=250, **SETTINGS)
@given(mutated_records(), st.booleans(), st.booleans(), st.booleans())
def test_load_requests_on_mutated_records(sample, skip_invalid, require_subject, explicit_schema):
    schema, recs = sample
    COUNTS["mutated_records"] += 1
    try:
        out = load_requests(recs, schema=schema if explicit_schema else None, skip_invalid=skip_invalid, require_subject=require_subject)
    except CLEAR as e:
        refused("mutated_records", e, "schema", "no valid edit requests", "no edit requests")
        return
    check_loaded(out)


@settings(max_examples=100, **SETTINGS)
@given(
    st.lists(
        st.one_of(st.dictionaries(st.sampled_from(SCHEMA_KEYS), json_values, max_size=8), json_values), min_size=0, max_size=5
    ),
    st.sampled_from([None, *SCHEMAS]),
    st.booleans(),
)
def test_load_requests_on_generated_records(records, schema, skip_invalid):
    COUNTS["generated_records"] += 1
    try:
        out = load_requests(records, schema=schema, skip_invalid=skip_invalid)
    except CLEAR as e:
        refused("generated_records", e, "schema", "no valid edit requests", "no edit requests")
        return
    check_loaded(out)


_TMP = Path(tempfile.mkdtemp(prefix="lit_edit_fuzz_"))


@pytest.fixture(scope="module", autouse=True)
def _remove_generated_files():
    """The generated files, FIFOs and directories go when the module's tests are done."""
    yield
    shutil.rmtree(_TMP, ignore_errors=True)


@st.composite
def file_contents(draw):
    """Bytes of a .json/.jsonl file: valid records made bad, non-UTF-8, BOMs, deep nesting, truncation, garbage."""
    schema = draw(st.sampled_from(sorted(FIXTURE_FILES)))
    suffix = draw(st.sampled_from([".json", ".jsonl"]))
    recs = draw(mutated_records())[1] if draw(st.booleans()) else raw_records(schema)
    if suffix == ".jsonl":
        body = "\n".join(json.dumps(r, ensure_ascii=draw(st.booleans())) for r in recs)
    else:
        body = json.dumps(draw(st.sampled_from([recs, {"data": recs}, {"a": recs, "b": recs}, recs[:0]])), ensure_ascii=False)
    data = body.encode("utf-8", "surrogatepass")
    kind = draw(st.sampled_from(["as_is", "bom", "latin1", "truncate", "deep", "garbage", "nan", "u2028", "empty"]))
    if kind == "bom":
        data = b"\xef\xbb\xbf" + data
    elif kind == "latin1":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\xc3", b"\x80"])) + data[at:]
    elif kind == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "deep":
        n = draw(st.sampled_from([10, 1_000, 50_000, 200_000]))
        data = b"[" * n + b"]" * n if draw(st.booleans()) else b'{"prompt": "a", "target_new": "b"}\n' + b'{"a":' * n + b"1" + b"}" * n
    elif kind == "garbage":
        data = draw(st.binary(max_size=200))
    elif kind == "nan":
        data = data.replace(b'"prompt"', b'"prompt": NaN, "x"', 1)
    elif kind == "u2028":
        data = data.replace(b"is", "\u2028is".encode(), 1)
    elif kind == "empty":
        data = draw(st.sampled_from([b"", b"\n\n", b"   ", b"null", b"{}", b"[[]]", b"\"text\""]))
    return suffix, data


@settings(max_examples=120, **SETTINGS)
@given(file_contents(), st.booleans())
def test_load_requests_on_generated_files(content, skip_invalid):
    suffix, data = content
    COUNTS["files"] += 1
    path = _TMP / f"requests-{COUNTS['files']}{suffix}"
    path.write_bytes(data)
    try:
        out = load_requests(path, skip_invalid=skip_invalid)
    except CLEAR as e:
        refused("files", e, path.name, "no valid edit requests")
        return
    finally:
        path.unlink()
    check_loaded(out)


@settings(max_examples=40, **SETTINGS)
@given(st.one_of(texts, st.binary(max_size=20), st.integers(), st.none(), st.lists(st.integers(), max_size=2)), st.booleans())
def test_load_requests_on_generated_sources(source, as_path):
    """Sources that are not files: names, paths to nothing, directories, FIFOs, NUL bytes, other types."""
    COUNTS["sources"] += 1
    if isinstance(source, str) and "/" in source.strip("./") and not source.startswith((".", "/")):
        source = source.replace("/", "_")  # no Hub dataset ids: they would reach for the network
    n = COUNTS["sources"]
    if as_path and isinstance(source, str) and source.strip():
        source = _TMP / source.replace("/", "_")[:300]  # a path to nothing (too long, NUL byte, surrogates ...)
        if n % 5 == 0 and hasattr(os, "mkfifo"):
            source = _TMP / f"fifo-{n}.json"
            os.mkfifo(source)
        elif n % 5 == 1:
            source = _TMP / f"dir-{n}.jsonl"
            source.mkdir()
    try:
        load_requests(source)
    except CLEAR as e:
        refused("sources", e, "data source", "data path", "no edit requests", "cannot read edit requests", "not a regular file")
        return
    except Exception as e:  # the names of known benchmarks are resolved offline: a clear DataUnavailableError is fine too
        from lit_edit.data import DataUnavailableError

        assert isinstance(e, DataUnavailableError), f"{type(e).__name__}: {e}"
        REFUSED["sources"] += 1


# --------------------------------------------------------------------------- EditRequest


pairs = st.builds(PromptAnswer, texts, texts)


@settings(max_examples=150, **SETTINGS)
@given(
    st.one_of(st.just("The Louvre is in"), texts),
    st.one_of(st.just("Vienna"), texts, scalars),
    st.one_of(st.none(), st.just("Louvre"), texts, scalars),
    st.one_of(st.none(), texts),
    st.one_of(st.tuples(), st.lists(texts, max_size=3).map(tuple), texts, st.lists(json_values, max_size=2)),
    st.one_of(st.tuples(), st.lists(pairs, max_size=2).map(tuple), st.lists(json_values, max_size=2), texts),
    st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(), st.lists(st.integers(), max_size=2), st.booleans()),
    st.booleans(),
)
def test_edit_request_validate(prompt, target, subject, ground_truth, paraphrases, locality, case_id, require_subject):
    COUNTS["edit_request"] += 1
    request = EditRequest(prompt, target, subject, ground_truth, paraphrases, locality, (), case_id)
    try:
        request.validate(require_subject)
    except RecordError as e:
        refused("edit_request", e)
        return
    hash(request.case_id)
    assert request.subject is None or request.subject in request.prompt


# --------------------------------------------------------------------------- constructors

ints = st.one_of(st.integers(min_value=-3, max_value=300), st.sampled_from([10**20, -(10**20)]))
numbers = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, -0.0]))
anything = st.one_of(
    numbers, st.none(), st.booleans(), st.text(max_size=8), st.lists(ints, max_size=3), st.dictionaries(st.text(max_size=3), ints, max_size=2)
)


def options(strategies: dict) -> st.SearchStrategy:
    """Dictionaries of 1-3 of the given options, each from its own strategy or from anything at all."""
    return st.dictionaries(st.sampled_from(sorted(strategies)), st.just(None), min_size=1, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.one_of(strategies[k], anything) for k in keys})
    )


DATA_OPTIONS = {
    "path": st.one_of(st.none(), st.sampled_from(["demo", "", " ", "counterfakt", "x.json", "no/such.jsonl", "\x00"]), texts),
    "schema": st.one_of(st.none(), st.sampled_from([*SCHEMAS, "squad", ""])),
    "limit": st.one_of(st.none(), ints),
    "offset": ints,
    "batch_size": ints,
    "shuffle": st.booleans(),
    "eval_limit": st.one_of(st.none(), ints),
    "require_subject": st.booleans(),
    "split": st.one_of(st.none(), st.text(max_size=5)),
    "seed": ints,
    "skip_invalid": st.booleans(),
}


@settings(max_examples=120, **SETTINGS)
@given(options(DATA_OPTIONS), st.booleans())
def test_edit_data_module_constructor(kwargs, with_requests):
    COUNTS["data_module"] += 1
    if isinstance(kwargs.get("path"), str) and "/" in kwargs["path"].strip("./"):
        kwargs["path"] = kwargs["path"].replace("/", "_")
    if with_requests:
        kwargs["requests"] = raw_records("lit_edit")
    try:
        dm = EditDataModule(**kwargs)
    except CLEAR as e:
        refused("data_module", e, *kwargs, "data source")
        return
    if with_requests or kwargs.get("path") in (None, "demo"):  # in memory: loaded by now, or loadable offline
        check_loaded(dm.load())
        n = dm.hparams.eval_limit
        assert n is None or len(dm.eval_requests) == min(n, len(dm.load()))


VALUE_OPTIONS = {
    "lr": numbers, "steps": ints, "loss_tol": numbers, "kl_factor": numbers, "weight_decay": numbers,
    "clamp_norm_factor": numbers, "batch_size": ints, "partial_forward": st.booleans(),
    "stop": st.one_of(st.none(), st.just("eos"), texts, st.integers()),
}
STATISTICS_OPTIONS = {
    "adjustment": st.booleans(), "update_weight": numbers, "n_samples": ints, "max_length": ints,
    "dtype": st.sampled_from(["float32", "float64", "float16", "", "fp32"]), "corpus": texts, "batch_size": ints,
    "published": st.one_of(st.none(), texts, st.integers()),
}
TEMPLATE_OPTIONS = {"seed": ints, "max_per_group": st.one_of(st.none(), ints)}
GROUPS = {"values": (ValueOptions, VALUE_OPTIONS), "statistics": (StatisticsOptions, STATISTICS_OPTIONS),
          "templates": (TemplateOptions, TEMPLATE_OPTIONS)}


def _finite_ok(group: str, kwargs: dict, built) -> None:
    """What a constructed option group must hold: finite numbers, positive counts."""
    for name in kwargs:
        got = getattr(built, name)
        if isinstance(got, float):
            assert math.isfinite(got), (group, name, got)


@settings(max_examples=200, **SETTINGS)
@given(st.sampled_from(sorted(GROUPS)).flatmap(lambda g: st.tuples(st.just(g), options(GROUPS[g][1]))))
def test_closed_form_option_groups(sample):
    group, kwargs = sample
    cls = GROUPS[group][0]
    COUNTS["option_groups"] += 1
    try:
        built = cls(**kwargs)
    except CLEAR as e:
        refused("option_groups", e, *(f"{group}.{k}" for k in kwargs))
        return
    _finite_ok(group, kwargs, built)
    for name in ("steps", "batch_size", "n_samples"):
        if getattr(built, name, None) is not None:
            assert getattr(built, name) >= 1
    if group == "statistics":
        assert built.max_length >= 2


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """One tiny random model for every editor constructed in this module (construction does not change it)."""
    return make_tiny_llama(len(tokenizer)), tokenizer


FT_OPTIONS = {
    "lr": numbers, "min_loss": numbers, "adam_eps": numbers, "linf_eps": st.one_of(st.none(), numbers),
    "lora_rank": st.one_of(st.none(), ints), "lora_alpha": st.one_of(st.none(), numbers), "preservation": numbers,
    "preservation_texts": ints, "layers_to_transform": st.one_of(st.none(), ints, st.lists(ints, max_size=3)),
    "loss": st.sampled_from(["ft_m", "ft_l", "ft_x"]), "append_eos": st.booleans(),
    "target_modules": st.one_of(st.just(["mlp.down_proj"]), st.just([]), st.just("mlp.*")),
}


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          derandomize=True, database=None)
@given(options(FT_OPTIONS))
def test_fine_tuning_editor_constructor(tiny, kwargs):
    from lit_edit.editors import LocFTBF

    model, tokenizer = tiny
    COUNTS["fine_tuning"] += 1
    kwargs.setdefault("target_modules", ["mlp.down_proj"])
    try:
        editor = LocFTBF(model=model, tokenizer=tokenizer, **kwargs)
    except CLEAR as e:
        refused("fine_tuning", e, *kwargs)
        return
    layers = kwargs.get("layers_to_transform")
    if layers is not None:
        blocks = [layers] if isinstance(layers, int) else layers
        assert blocks and all(0 <= b < 2 for b in blocks) and len(set(blocks)) == len(blocks)
    assert editor.learning_rate > 0 and math.isfinite(editor.learning_rate)


ROME_OPTIONS = {
    "layers": st.one_of(st.none(), ints, st.lists(ints, max_size=3)),
    "values": st.one_of(st.none(), options(VALUE_OPTIONS)),
    "statistics": st.one_of(st.none(), options(STATISTICS_OPTIONS)),
    "templates": st.one_of(st.none(), options(TEMPLATE_OPTIONS)),
    "accumulate": st.booleans(),
}


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          derandomize=True, database=None)
@given(options(ROME_OPTIONS))
def test_rome_constructor(tiny, kwargs):
    from lit_edit.editors import ROME

    model, tokenizer = tiny
    COUNTS["rome"] += 1
    try:
        editor = ROME(model=model, tokenizer=tokenizer, **kwargs)
    except CLEAR as e:
        refused("rome", e, *kwargs)
        return
    if kwargs.get("layers") is not None:
        assert editor.layer in (0, 1)


# --------------------------------------------------------------------------- the count


def test_at_least_500_generated_bad_inputs_and_no_unclear_error():
    """Runs last (pytest keeps file order): every fuzz test above ran without an unclear exception."""
    ran = [name for name in COUNTS if COUNTS[name]]
    if len(ran) < FUZZ_TESTS:
        pytest.skip(f"only {len(ran)} of the {FUZZ_TESTS} fuzz tests ran (selected with -k?)")
    total, refusals = sum(COUNTS.values()), sum(REFUSED.values())
    print(f"\nfuzzed {total} generated inputs, {refusals} refused with a clear error: "
          + ", ".join(f"{k} {COUNTS[k]}/{REFUSED[k]}" for k in sorted(COUNTS)))
    assert refusals >= 500, (COUNTS, REFUSED)
