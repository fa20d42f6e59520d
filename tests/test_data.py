"""Tests of the edit-request loaders, the canonical schema and the built-in demo set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FIXTURE_FILES, raw_records

from lit_edit.data.demo import demo_records, demo_requests
from lit_edit.data.loaders import SCHEMAS, detect_schema, load_requests, save_requests
from lit_edit.data.request import EditRequest, PromptAnswer, RecordError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"



def expect_record_error(records, rid, field, schema=None, **kwargs) -> RecordError:
    """Loading ``records`` must fail with a RecordError naming record ``rid`` and ``field``."""
    with pytest.raises(RecordError) as excinfo:
        load_requests(records, schema=schema, **kwargs)
    err = excinfo.value
    assert err.record == rid
    assert field in err.field
    msg = str(err)
    assert f"record {rid}" in msg
    assert field in msg
    return err


# --------------------------------------------------------------------------- schema detection


@pytest.mark.parametrize("schema", sorted(FIXTURE_FILES))
def test_detect_schema_on_fixtures(schema):
    for rec in raw_records(schema):
        assert detect_schema(rec) == schema


def test_every_schema_has_a_fixture():
    assert set(SCHEMAS) == set(FIXTURE_FILES)


# --------------------------------------------------------------------------- field mapping per schema


@pytest.mark.parametrize("schema", [None, "counterfact"])
def test_counterfact_nested(schema):
    reqs = load_requests(FIXTURE_FILES["counterfact"], schema=schema)
    assert len(reqs) == 3
    r = reqs[0]
    assert r == EditRequest(
        prompt="The official language of the Netherlands is",
        subject="the Netherlands",
        target_new="Finnish",
        ground_truth="Dutch",
        paraphrase_prompts=(
            "Road signs in the Netherlands are written in",
            "Schools in the Netherlands teach mainly in",
        ),
        # neighborhood prompts keep the true answer of the edited fact
        locality=(
            PromptAnswer("The official language of Flanders is", "Dutch"),
            PromptAnswer("The official language of Suriname is", "Dutch"),
            PromptAnswer("The official language of Aruba is", "Dutch"),
        ),
        portability=(),
        case_id=101,
    )
    # the subject may open the template ("{}, which is located in")
    assert reqs[1].prompt == "Leaning Tower of Pisa, which is located in"
    template = raw_records("counterfact")[1]["requested_rewrite"]["prompt"]
    assert reqs[1].prompt == template.format("Leaning Tower of Pisa")
    assert reqs[1].target_new == "Peru" and reqs[1].ground_truth == "Italy"
    assert reqs[1].locality == (
        PromptAnswer("Lake Como, which is located in", "Italy"),
        PromptAnswer("The Uffizi Gallery, which is located in", "Italy"),
    )
    assert reqs[2].case_id == 103
    assert reqs[2].locality == ()
    assert reqs[2].paraphrase_prompts == ("On the pitch, Marta Vieira da Silva usually plays as a",)
    # attribute and generation prompts are not part of the request
    assert all("Finland" not in pa.prompt for pa in reqs[0].locality)


@pytest.mark.parametrize("schema", [None, "counterfact_flat"])
def test_counterfact_flat(schema):
    reqs = load_requests(FIXTURE_FILES["counterfact_flat"], schema=schema)
    assert [r.case_id for r in reqs] == [7, 8, 9]
    assert reqs[0] == EditRequest(
        prompt="The headquarters of Nintendo is in",
        subject="Nintendo",
        target_new="Seoul",
        ground_truth="Kyoto",
        paraphrase_prompts=("Nintendo has its main offices in the city of",),
        locality=(PromptAnswer("The headquarters of Capcom is in", "Osaka"),),
        case_id=7,
    )
    assert reqs[2].target_new == "North Sea" and reqs[2].ground_truth == "Black Sea"
    assert reqs[2].locality == (PromptAnswer("The Thames flows into the", "North Sea"),)


def test_counterfact_flat_list_valued_fields():
    rec = raw_records("counterfact_flat")[0]
    rec["target_new"] = ["Seoul"]
    rec["ground_truth"] = ["Kyoto", "Kyōto"]
    rec["rephrase_prompt"] = ["Nintendo is based in", "Nintendo's home city is"]
    rec["locality_prompt"] = ["The headquarters of Capcom is in", "The headquarters of Sega is in"]
    rec["locality_ground_truth"] = ["Osaka", "Tokyo"]
    (r,) = load_requests([rec])
    assert r.target_new == "Seoul" and r.ground_truth == "Kyoto"
    assert r.paraphrase_prompts == ("Nintendo is based in", "Nintendo's home city is")
    assert r.locality == (
        PromptAnswer("The headquarters of Capcom is in", "Osaka"),
        PromptAnswer("The headquarters of Sega is in", "Tokyo"),
    )


def test_counterfact_flat_without_ground_truth():
    rec = raw_records("counterfact_flat")[0]
    del rec["ground_truth"]
    (r,) = load_requests([rec])
    assert r.ground_truth is None


@pytest.mark.parametrize("schema", [None, "zsre"])
def test_zsre(schema):
    reqs = load_requests(FIXTURE_FILES["zsre"], schema=schema)
    # MEND zsRE records have no id: the position in the file is used
    assert [r.case_id for r in reqs] == [0, 1, 2]
    assert reqs[0] == EditRequest(
        prompt="Which country is Kilimanjaro in?",
        subject="Kilimanjaro",
        target_new="Kenya",  # alt
        ground_truth="Tanzania",  # answers[0]
        paraphrase_prompts=("In what country can Kilimanjaro be found?",),
        locality=(PromptAnswer("nq question: who wrote the novel pride and prejudice", "Jane Austen"),),
        case_id=0,
    )
    assert reqs[1].target_new == "C. S. Lewis"
    assert reqs[1].ground_truth == "J. R. R. Tolkien"  # first of several answers
    assert reqs[2].locality == (PromptAnswer("nq question: how many strings does a standard violin have", "four"),)


def test_zsre_ground_truth_falls_back_to_pred_and_loc_is_optional():
    rec = raw_records("zsre")[0]
    del rec["answers"]
    del rec["loc"], rec["loc_ans"]
    (r,) = load_requests([rec])
    assert r.ground_truth == "Tanzania"
    assert r.locality == ()


@pytest.mark.parametrize("schema", [None, "wikibigedit"])
def test_wikibigedit(schema):
    reqs = load_requests(FIXTURE_FILES["wikibigedit"], schema=schema)
    assert [r.case_id for r in reqs] == ["wbe-1", "wbe-2", "wbe-3"]
    assert reqs[0] == EditRequest(
        prompt="Lake Baikal is located in the country of",
        subject="Lake Baikal",
        target_new="Mongolia",
        ground_truth=None,
        # rephrase first, then the persona-styled rephrase
        paraphrase_prompts=(
            "Lake Baikal lies within the borders of",
            "Hey, quick one: which country is Lake Baikal in? It is in",
        ),
        locality=(PromptAnswer("The longest river in Africa is the", "Nile"),),
        # multi-hop question → portability
        portability=(PromptAnswer("The capital of the country where Lake Baikal is located is", "Ulaanbaatar"),),
        case_id="wbe-1",
    )
    assert reqs[1].portability == (
        PromptAnswer("The principal conductor of Orchestra Aurora was born in the country of", "Norway"),
    )
    assert reqs[2].portability == ()  # empty mhop


def test_wikibigedit_list_valued_fields_and_missing_subject():
    rec = raw_records("wikibigedit")[0]
    del rec["subject"]
    rec["loc"] = ["The longest river in Africa is the", "The largest desert in Africa is the"]
    rec["loc_ans"] = ["Nile", "Sahara"]
    (r,) = load_requests([rec])
    assert r.subject is None
    assert r.locality == (
        PromptAnswer("The longest river in Africa is the", "Nile"),
        PromptAnswer("The largest desert in Africa is the", "Sahara"),
    )
    # locate-and-edit editors need the subject
    expect_record_error([rec], "wbe-1", "subject", require_subject=True)


@pytest.mark.parametrize("schema", [None, "lit_edit"])
def test_lit_edit_canonical(schema):
    reqs = load_requests(FIXTURE_FILES["lit_edit"], schema=schema)
    assert [r.case_id for r in reqs] == ["fx-0", "fx-1", "fx-2"]
    assert reqs[1] == EditRequest(
        prompt="The programming language Rust was first sponsored by",
        subject="Rust",
        target_new="IBM",
        ground_truth="Mozilla",
        paraphrase_prompts=(
            "Rust, the programming language, was originally backed by",
            "The early development of Rust was funded by",
        ),
        locality=(
            PromptAnswer("The Python language was created by Guido van", "Rossum"),
            PromptAnswer("Linux was created by Linus", "Torvalds"),
        ),
        portability=(
            PromptAnswer("The organization that first sponsored Rust is headquartered in the state of", "New York"),
        ),
        case_id="fx-1",
    )
    assert reqs[2].ground_truth is None
    assert reqs[2].paraphrase_prompts == () and reqs[2].locality == () and reqs[2].portability == ()


def test_lit_edit_without_case_id_uses_position():
    recs = [{"prompt": "The Louvre is in", "target_new": "Vienna"}, {"prompt": "Rust is by", "target_new": "IBM"}]
    assert [r.case_id for r in load_requests(recs)] == [0, 1]
    assert [r.case_id for r in load_requests(recs, offset=1)] == [1]


def test_lit_edit_single_string_paraphrase():
    rec = raw_records("lit_edit")[0]
    rec["paraphrase_prompts"] = "The Louvre museum can be visited in the city of"
    (r,) = load_requests([rec])
    assert r.paraphrase_prompts == ("The Louvre museum can be visited in the city of",)


# --------------------------------------------------------------------------- input kinds


@pytest.mark.parametrize("schema", sorted(FIXTURE_FILES))
def test_path_str_list_and_dataset_inputs_agree(schema):
    import datasets

    path = FIXTURE_FILES[schema]
    from_path = load_requests(path)
    assert len(from_path) == 3
    assert load_requests(str(path)) == from_path
    assert load_requests(raw_records(schema)) == from_path
    assert load_requests(raw_records(schema), schema=schema) == from_path
    ds = datasets.Dataset.from_list(raw_records(schema))
    assert load_requests(ds) == from_path
    assert load_requests(ds, schema=schema) == from_path
    assert load_requests(datasets.DatasetDict({"train": ds})) == from_path
    assert load_requests(datasets.DatasetDict({"test": ds}), split="test") == from_path


def test_edit_request_objects_pass_through():
    reqs = load_requests(FIXTURE_FILES["counterfact_flat"])
    assert load_requests(reqs) == reqs
    assert load_requests(tuple(reqs), limit=1) == reqs[:1]


def test_wrapped_json_object(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": raw_records("zsre")}))
    assert load_requests(path) == load_requests(FIXTURE_FILES["zsre"])


def test_limit_and_offset():
    path = FIXTURE_FILES["counterfact_flat"]
    assert [r.case_id for r in load_requests(path, limit=2)] == [7, 8]
    assert [r.case_id for r in load_requests(path, offset=1)] == [8, 9]
    assert [r.case_id for r in load_requests(path, offset=1, limit=1)] == [8]
    assert [r.case_id for r in load_requests(path, limit=100)] == [7, 8, 9]
    # position-based ids stay absolute under an offset
    assert [r.case_id for r in load_requests(FIXTURE_FILES["zsre"], offset=1, limit=5)] == [1, 2]
    with pytest.raises(ValueError, match=r"no edit requests in .* \(3 records; offset=3, limit=None\)"):
        load_requests(path, offset=3)
    records = [{"prompt": "p", "target_new": "t"}] * 2
    with pytest.raises(ValueError, match=r"no edit requests in the given list \(2 records; offset=5") as err:
        load_requests(records, offset=5)
    assert "'prompt'" not in str(err.value)  # names the source, does not dump it
    with pytest.raises(ValueError, match="no edit requests"):
        load_requests(path, limit=0)


def test_limit_skips_bad_records_outside_the_window():
    recs = raw_records("counterfact_flat")
    recs[2]["target_new"] = ""
    assert len(load_requests(recs, limit=2)) == 2
    expect_record_error(recs, 9, "target_new")


# --------------------------------------------------------------------------- demo set


def test_demo_set_is_valid():
    reqs = demo_requests()
    assert 20 <= len(reqs) <= 30
    ids = [r.case_id for r in reqs]
    assert ids == [f"demo-{i}" for i in range(len(reqs))]
    assert len(set(ids)) == len(ids)
    for r in reqs:
        assert r.validate(require_subject=True) is r
        assert r.subject in r.prompt
        assert r.ground_truth and r.ground_truth != r.target_new
        for text in (r.target_new, r.ground_truth):
            assert text == text.strip()
        assert r.prompt == r.prompt.strip()
        assert 1 <= len(r.paraphrase_prompts) <= 2
        assert 1 <= len(r.locality) <= 2
        assert r.portability == ()


def test_demo_locality_avoids_edited_subjects():
    reqs = demo_requests()
    subjects = {r.subject for r in reqs}
    for r in reqs:
        for pa in r.locality:
            assert not any(s in pa.prompt for s in subjects), (r.case_id, pa.prompt)


def test_demo_records_are_canonical_copies():
    recs = demo_records()
    assert all(detect_schema(rec) == "lit_edit" for rec in recs)
    assert load_requests(recs) == demo_requests()
    recs[0]["target_new"] = "changed"
    assert demo_records()[0]["target_new"] == "Rome"
    assert demo_requests(limit=3) == demo_requests()[:3]
    assert demo_requests()[0] == EditRequest(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        target_new="Rome",
        ground_truth="Paris",
        paraphrase_prompts=tuple(demo_records()[0]["paraphrase_prompts"]),
        locality=tuple(PromptAnswer(**x) for x in demo_records()[0]["locality"]),
        case_id="demo-0",
    )


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("source", ["demo", *sorted(FIXTURE_FILES)])
def test_save_load_round_trip(tmp_path, source):
    reqs = demo_requests() if source == "demo" else load_requests(FIXTURE_FILES[source])
    path = tmp_path / "requests.json"
    save_requests(reqs, path)
    assert load_requests(path) == reqs
    assert load_requests(path, schema="lit_edit") == reqs
    assert all(detect_schema(rec) == "lit_edit" for rec in json.loads(path.read_text()))


def test_to_dict_from_dict_round_trip():
    for r in demo_requests() + load_requests(FIXTURE_FILES["wikibigedit"]):
        assert EditRequest.from_dict(r.to_dict()) == r
        assert EditRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# --------------------------------------------------------------------------- bad records


def _flat():
    return raw_records("counterfact_flat")


def _nested():
    return raw_records("counterfact")


def _zsre():
    return raw_records("zsre")


def _wbe():
    return raw_records("wikibigedit")


def _lit():
    return raw_records("lit_edit")


def test_missing_fields():
    recs = _flat()
    del recs[1]["prompt"]
    expect_record_error(recs, 8, "prompt", schema="counterfact_flat")
    recs = _flat()
    del recs[0]["subject"]
    expect_record_error(recs, 7, "subject")
    recs = _flat()
    recs[2]["target_new"] = None
    expect_record_error(recs, 9, "target_new")

    recs = _nested()
    del recs[0]["requested_rewrite"]["subject"]
    expect_record_error(recs, 101, "subject")
    recs = _nested()
    del recs[1]["requested_rewrite"]["target_true"]
    expect_record_error(recs, 102, "target_true")
    recs = _nested()
    recs[2]["requested_rewrite"]["target_new"] = {"id": "Q172964"}
    expect_record_error(recs, 103, "target_new.str")
    recs = _nested()
    del recs[1]["requested_rewrite"]
    expect_record_error(recs, 102, "requested_rewrite")

    recs = _zsre()
    del recs[1]["alt"]
    expect_record_error(recs, 1, "alt", schema="zsre")
    recs = _zsre()
    del recs[2]["src"]
    expect_record_error(recs, 2, "src", schema="zsre")
    recs = _zsre()
    del recs[0]["loc_ans"]
    expect_record_error(recs, 0, "loc_ans")

    recs = _wbe()
    del recs[1]["ans"]
    expect_record_error(recs, "wbe-2", "ans", schema="wikibigedit")
    recs = _wbe()
    del recs[2]["update"]
    expect_record_error(recs, "wbe-3", "update", schema="wikibigedit")

    recs = _lit()
    del recs[1]["target_new"]
    expect_record_error(recs, "fx-1", "target_new", schema="lit_edit")
    recs = _lit()
    del recs[0]["prompt"]
    expect_record_error(recs, "fx-0", "prompt", schema="lit_edit")


def test_empty_targets():
    recs = _flat()
    recs[0]["target_new"] = ""
    expect_record_error(recs, 7, "target_new")
    recs = _flat()
    recs[1]["target_new"] = []
    expect_record_error(recs, 8, "target_new")
    recs = _flat()
    recs[1]["ground_truth"] = "  "
    expect_record_error(recs, 8, "ground_truth")
    recs = _nested()
    recs[0]["requested_rewrite"]["target_new"]["str"] = ""
    expect_record_error(recs, 101, "target_new")
    recs = _zsre()
    recs[1]["alt"] = "   "
    expect_record_error(recs, 1, "alt")  # errors name the file's own field
    recs = _zsre()
    recs[2]["answers"] = [""]
    expect_record_error(recs, 2, "answers[0]")
    recs = _wbe()
    recs[0]["ans"] = ""
    expect_record_error(recs, "wbe-1", "ans")
    recs = _lit()
    recs[2]["target_new"] = " "
    expect_record_error(recs, "fx-2", "target_new")


def test_subject_not_in_prompt():
    recs = _flat()
    recs[1]["subject"] = "Diego Rivera"
    err = expect_record_error(recs, 8, "subject")
    assert "Diego Rivera" in str(err)
    recs = _zsre()
    recs[0]["subject"] = "Mount Kenya"
    expect_record_error(recs, 0, "subject")
    recs = _wbe()
    recs[2]["subject"] = "Port Falcon"
    expect_record_error(recs, "wbe-3", "subject")
    recs = _lit()
    recs[0]["subject"] = "louvre"  # case matters: the subject must occur verbatim
    expect_record_error(recs, "fx-0", "subject")


def test_non_string_fields():
    recs = _flat()
    recs[0]["prompt"] = 5
    err = expect_record_error(recs, 7, "prompt")
    assert "int" in str(err)
    recs = _flat()
    recs[2]["rephrase_prompt"] = 5
    expect_record_error(recs, 9, "rephrase_prompt")
    recs = _flat()
    recs[1]["locality_prompt"] = ["Diego Rivera was a citizen of", 3]
    expect_record_error(recs, 8, "locality_prompt")
    recs = _nested()
    recs[1]["requested_rewrite"]["target_true"] = {"str": 38, "id": "Q38"}
    expect_record_error(recs, 102, "target_true")
    recs = _nested()
    recs[0]["requested_rewrite"]["subject"] = ["the Netherlands"]
    expect_record_error(recs, 101, "subject")
    recs = _nested()
    recs[0]["neighborhood_prompts"] = [1, 2]
    expect_record_error(recs, 101, "neighborhood_prompts")
    recs = _zsre()
    recs[1]["src"] = ["Who is the author of The Hobbit?"]
    expect_record_error(recs, 1, "src")
    recs = _zsre()
    recs[2]["loc"] = {"q": "x"}
    expect_record_error(recs, 2, "loc")
    recs = _zsre()
    recs[0]["alt"] = 7
    expect_record_error(recs, 0, "alt")
    recs = _wbe()
    recs[0]["update"] = None
    expect_record_error(recs, "wbe-1", "update")
    recs = _lit()
    recs[0]["subject"] = 3
    expect_record_error(recs, "fx-0", "subject")
    recs = _lit()
    recs[1]["paraphrase_prompts"] = ["fine", 4]
    expect_record_error(recs, "fx-1", "paraphrase_prompts[1]")
    recs = _lit()
    recs[1]["locality"][1]["answer"] = 7
    expect_record_error(recs, "fx-1", "locality[1].answer")
    recs = _lit()
    recs[1]["portability"][0]["prompt"] = ""
    expect_record_error(recs, "fx-1", "portability[0].prompt")


def test_locality_count_mismatch():
    recs = _flat()
    recs[0]["locality_prompt"] = ["The headquarters of Capcom is in", "The headquarters of Sega is in"]
    err = expect_record_error(recs, 7, "locality_ground_truth")
    assert "1 answers for 2 prompts" in str(err)
    recs = _wbe()
    recs[1]["loc_ans"] = ["Beethoven", "Mozart"]
    expect_record_error(recs, "wbe-2", "loc_ans")
    recs = _wbe()
    recs[0]["mhop_ans"] = ""  # a multi-hop question without its answer
    expect_record_error(recs, "wbe-1", "mhop_ans")
    recs = _lit()
    recs[0]["locality"] = [{"prompt": "The capital of Norway is"}]
    expect_record_error(recs, "fx-0", "locality")


def test_nested_prompt_needs_placeholder():
    recs = _nested()
    recs[1]["requested_rewrite"]["prompt"] = "Leaning Tower of Pisa, which is located in"
    err = expect_record_error(recs, 102, "requested_rewrite.prompt")
    assert "{}" in str(err)
    recs = _nested()
    recs[2]["requested_rewrite"]["prompt"] = "{} plays in the position of {}"
    expect_record_error(recs, 103, "requested_rewrite.prompt")


def test_record_that_is_not_an_object():
    with pytest.raises(RecordError, match="record 0"):
        load_requests(["The Eiffel Tower is in"])
    recs = _flat()
    recs.append("stray string")
    err = expect_record_error(recs, 3, "<record>")
    assert "str" in str(err)


def test_skip_invalid_drops_bad_records(caplog):
    recs = _flat()
    recs[1]["target_new"] = ""
    recs.append(["not", "an", "object"])
    with caplog.at_level("WARNING", logger="lit_edit.data.loaders"):
        reqs = load_requests(recs, skip_invalid=True)
    assert [r.case_id for r in reqs] == [7, 9]
    assert "skipped 2 invalid records" in caplog.text and "record 8" in caplog.text
    recs = _zsre()
    for rec in recs:
        rec["alt"] = ""
    with pytest.raises(ValueError, match="no valid edit requests"):
        load_requests(recs, skip_invalid=True)


# --------------------------------------------------------------------------- bad sources


def test_empty_inputs(tmp_path):
    with pytest.raises(ValueError, match="no edit requests"):
        load_requests([])
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n\n")
    with pytest.raises(ValueError, match="no edit requests"):
        load_requests(empty_jsonl)
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    with pytest.raises(ValueError, match="no edit requests"):
        load_requests(empty_list)
    blank = tmp_path / "blank.json"
    blank.write_text("")
    with pytest.raises(ValueError, match="blank.json"):
        load_requests(blank)


def test_unknown_schema_name():
    with pytest.raises(ValueError, match="unknown schema 'mquake'") as excinfo:
        load_requests(FIXTURE_FILES["zsre"], schema="mquake")
    for name in SCHEMAS:
        assert name in str(excinfo.value)


def test_undetectable_schema():
    recs = [{"question": "Where is the Louvre?", "answer": "Paris"}]
    with pytest.raises(ValueError, match="cannot tell the schema") as excinfo:
        load_requests(recs)
    assert "question" in str(excinfo.value) and "answer" in str(excinfo.value)
    with pytest.raises(ValueError, match="schema="):
        detect_schema(recs[0])


def test_invalid_json(tmp_path):
    lines = (FIXTURE_FILES["lit_edit"]).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1][:-5], lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_requests(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "x",\n "target_new": }]')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON .*line 2"):
        load_requests(bad_json)
    not_a_list = tmp_path / "scalar.json"
    not_a_list.write_text("42")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_requests(not_a_list)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_text("prompt,target_new\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_requests(path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_requests(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_requests(str(tmp_path / "missing.jsonl"))
    # a relative path is not mistaken for a hub dataset name
    with pytest.raises(FileNotFoundError, match="no/such/requests.json"):
        load_requests("no/such/requests.json")


def test_unsupported_source_type():
    with pytest.raises(TypeError):
        load_requests(42)
    with pytest.raises(TypeError):
        load_requests({"prompt": "x", "target_new": "y"})


# --------------------------------------------------------------------------- benchmarks by name


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """An empty ``$LIT_EDIT_DATA`` directory and a per-test cache root (no local copies yet)."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("LIT_EDIT_DATA", str(data))
    monkeypatch.setenv("LIT_EDIT_HOME", str(tmp_path / "home"))
    return data


def test_name_resolves_from_lit_edit_data(data_env, tmp_path, monkeypatch, caplog):
    import logging
    import os
    import shutil

    from lit_edit.data import EditDataModule

    shutil.copy(FIXTURE_FILES["counterfact"], data_env / "counterfact-small.json")
    missing = tmp_path / "not-there"
    monkeypatch.setenv("LIT_EDIT_DATA", os.pathsep.join([str(missing), str(data_env)]))  # several directories
    expected = load_requests(FIXTURE_FILES["counterfact"], schema="counterfact")  # the original nested schema
    with caplog.at_level(logging.INFO, logger="lit_edit"):
        assert load_requests("counterfact") == expected
    assert str(data_env / "counterfact-small.json") in caplog.text  # the file the name resolved to
    assert "schema 'counterfact'" in caplog.text
    assert load_requests("CounterFact", limit=2) == expected[:2]
    assert EditDataModule(path="counterfact", limit=2).load() == expected[:2]


def test_lookup_order_and_cache_root(data_env, tmp_path, monkeypatch):
    home_data = tmp_path / "home" / "data"
    home_data.mkdir(parents=True)
    (home_data / "zsre-cached.json").write_text(json.dumps(raw_records("zsre")[:1]))
    assert len(load_requests("zsre")) == 1  # $LIT_EDIT_DATA has no zsRE file: <cache root>/data
    (data_env / "ZSRE-mend.JSONL").write_text("\n".join(json.dumps(r) for r in raw_records("zsre")))
    assert load_requests("zsre") == load_requests(FIXTURE_FILES["zsre"])  # $LIT_EDIT_DATA first, any case
    monkeypatch.delenv("LIT_EDIT_DATA")
    assert len(load_requests("zsre")) == 1


def test_local_copy_in_another_schema_of_its_family(data_env):
    from lit_edit.data.registry import KNOWN_DATASETS

    flat = raw_records("counterfact_flat")
    (data_env / "wikibigedit-3k.json").write_text(json.dumps(flat))  # LocFT's WikiBigEdit subset is flat
    assert load_requests("wikibigedit") == load_requests(flat)
    (data_env / "counterfact-wrong.json").write_text(json.dumps(raw_records("zsre")))
    with pytest.raises(ValueError, match="schema 'zsre'") as excinfo:
        load_requests("counterfact")
    for schema in KNOWN_DATASETS["counterfact"].schemas:
        assert schema in str(excinfo.value)
    assert load_requests("counterfact", schema="zsre") == load_requests(FIXTURE_FILES["zsre"])  # an explicit schema wins


def test_offline_error_names_the_data_set_and_the_variable(data_env, monkeypatch):
    from lit_edit.data import DataUnavailableError, EditDataModule

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as excinfo:
        load_requests("counterfact")
    msg = str(excinfo.value)
    assert "'counterfact'" in msg and "LIT_EDIT_DATA" in msg and "HF_DATASETS_OFFLINE" in msg
    assert "counterfact*.json" in msg  # the file pattern expected
    assert str(data_env) in msg and "data" in msg  # the directories searched
    with pytest.raises(DataUnavailableError, match="'wikibigedit'"):
        EditDataModule(path="wikibigedit").load()


def test_hub_copy_when_there_is_no_local_one(data_env, monkeypatch):
    import datasets

    from lit_edit.data import DataUnavailableError
    from lit_edit.data.registry import KNOWN_DATASETS

    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        return datasets.Dataset.from_list(raw_records("counterfact" if path == "azhx/counterfact" else "zsre"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_requests("counterfact") == load_requests(FIXTURE_FILES["counterfact"])
    assert calls[-1] == ("azhx/counterfact", "train", {})
    assert load_requests("zsre", split="validation") == load_requests(FIXTURE_FILES["zsre"])
    assert calls[-1] == ("json", "validation", {"data_files": KNOWN_DATASETS["zsre"].data_files})
    # the Hub copy is read in its own schema, not detected from the records
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(raw_records("zsre")))
    with pytest.raises(RecordError, match="requested_rewrite"):
        load_requests("counterfact")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'azhx/counterfact' on the Hub (ConnectTimeout)")

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataUnavailableError, match="ConnectTimeout") as excinfo:
        load_requests("counterfact")
    assert "LIT_EDIT_DATA" in str(excinfo.value) and "azhx/counterfact" in str(excinfo.value)


def test_unknown_name_lists_the_known_ones(data_env):
    from lit_edit.data import KNOWN_DATASETS, EditDataModule

    with pytest.raises(FileNotFoundError, match="'counterfakt'") as excinfo:
        load_requests("counterfakt")
    with pytest.raises(ValueError, match="'counterfakt'") as early:  # at construction, before any model loads
        EditDataModule(path="counterfakt")
    for name in KNOWN_DATASETS:
        assert name in str(excinfo.value) and name in str(early.value)


def test_an_existing_file_is_not_taken_for_a_name(tmp_path, monkeypatch, data_env):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zsre").write_text("[]")  # a file named like a data set is a file
    with pytest.raises(ValueError, match="unsupported file type"):
        load_requests("zsre")
    with pytest.raises(FileNotFoundError, match="counterfact.json"):
        load_requests("counterfact.json")  # looks like a file: a missing file, not the data set


# --------------------------------------------------------------------------- case ids


def test_duplicate_case_ids_are_refused_naming_both_records(caplog):
    from lit_edit.data import EditDataModule

    recs = _flat()
    recs[2]["case_id"] = 7  # the id of record 0
    err = expect_record_error(recs, 2, "case_id")
    assert "record 0" in str(err) and "7" in str(err)  # both positions and the id
    # an explicit id equal to another record's position collides too
    recs = [{"prompt": "The Louvre is in", "target_new": "Vienna"}, {"prompt": "Rust is by", "target_new": "IBM", "case_id": 0}]
    expect_record_error(recs, 1, "case_id")
    # requests given in Python: the data module refuses them at construction
    reqs = load_requests(FIXTURE_FILES["counterfact_flat"])
    dup = EditRequest(prompt="Seoul is in", target_new="Japan", case_id=reqs[0].case_id)
    with pytest.raises(RecordError, match=r"record 3: field 'case_id'.*record 0"):
        EditDataModule(requests=[*reqs, dup])
    with caplog.at_level("WARNING", logger="lit_edit.data.loaders"):  # skip_invalid keeps the first
        assert [r.prompt for r in load_requests([*reqs, dup], skip_invalid=True)] == [r.prompt for r in reqs]
    assert "case_id" in caplog.text


@pytest.mark.parametrize("bad", [[1, 2], {"id": 1}, float("nan"), float("inf"), 1.5, True, "", " ", "\u200b"])
def test_case_id_must_be_a_string_or_an_integer(bad):
    recs = _lit()
    recs[1]["case_id"] = bad
    err = expect_record_error(recs, 1, "case_id")  # named by position: the id itself is unusable
    if not isinstance(bad, str):
        assert "must be a string or an integer" in str(err)
    with pytest.raises(RecordError, match="record 0: field 'case_id'"):
        load_requests([EditRequest(prompt="Rust is by", target_new="IBM", case_id=bad)])


# --------------------------------------------------------------------------- schemas per record


def test_skip_invalid_detects_the_schema_of_each_record(caplog):
    unknown = {"question": "Where is the Louvre?", "answer": "Paris"}
    with caplog.at_level("WARNING", logger="lit_edit.data.loaders"):
        reqs = load_requests([unknown, *_zsre()], skip_invalid=True)  # a first record of unknown schema
    assert [r.case_id for r in reqs] == [1, 2, 3]  # positions in the source
    assert "skipped 1 invalid records" in caplog.text and "cannot tell the schema" in caplog.text
    mixed = _flat()[:1] + [{**rec, "case_id": f"z{i}"} for i, rec in enumerate(_zsre() * 3)]  # 1 flat + 9 zsRE
    caplog.clear()
    with caplog.at_level("WARNING", logger="lit_edit.data.loaders"):
        reqs = load_requests(mixed, skip_invalid=True)
    assert len(reqs) == 10 and reqs[1].target_new == "Kenya"
    assert "1 counterfact_flat" in caplog.text and "9 zsre" in caplog.text


def test_mixed_schemas_without_skip_invalid_name_the_record():
    mixed = _flat()[:1] + _zsre()
    err = expect_record_error(mixed, 1, "<record>")
    assert "'zsre'" in str(err) and "'counterfact_flat'" in str(err) and "record 0" in str(err)
    # canonical records with only the keys both schemas share read the same in a flat file
    minimal = {"prompt": "The Louvre is in", "subject": "Louvre", "target_new": "Vienna", "case_id": 99}
    assert len(load_requests([*_flat(), minimal])) == 4
    assert len(load_requests([minimal, *_flat()])) == 4


# --------------------------------------------------------------------------- files


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_directory_is_refused_not_read(tmp_path):
    import os
    import signal

    fifo = tmp_path / "requests.json"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading the FIFO blocked"))
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match=r"requests\.json: a FIFO \(named pipe\), not a regular file"):
            load_requests(fifo)
    finally:
        signal.alarm(0)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"dir\.jsonl: a directory, not a regular file"):
        load_requests(tmp_path / "dir.jsonl")


def test_file_encodings(tmp_path):
    recs = _lit()
    bom = tmp_path / "bom.json"
    bom.write_text(json.dumps(recs), encoding="utf-8-sig")  # what Windows editors write
    assert load_requests(bom) == load_requests(recs)
    bom_lines = tmp_path / "bom.jsonl"
    bom_lines.write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8-sig")
    assert load_requests(bom_lines) == load_requests(recs)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt": "ok", "target_new": "x"}\n{"prompt": "Caf\xe9 is in", "target_new": "Rome"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_requests(latin)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not readable JSON \(nested too deeply"):
        load_requests(deep)
    deep_lines = tmp_path / "deep.jsonl"
    deep_lines.write_text('{"prompt": "a", "target_new": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: not readable JSON"):
        load_requests(deep_lines)
    # U+2028 may stand unescaped inside a JSON string: it does not end a JSONL line
    sep = tmp_path / "sep.jsonl"
    sep.write_text(json.dumps({"prompt": "The Louvre\u2028is in", "target_new": "Vienna"}, ensure_ascii=False) + "\n")
    assert load_requests(sep)[0].prompt == "The Louvre\u2028is in"


def test_empty_path_is_refused_naming_it():
    from lit_edit.data import EditDataModule

    with pytest.raises(ValueError, match="data source is an empty string"):
        load_requests("")
    with pytest.raises(ValueError, match="path is an empty string"):
        EditDataModule(path="")


# --------------------------------------------------------------------------- texts


def test_lone_surrogates_and_invisible_texts_are_refused_naming_the_field(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"case_id": "s-1", "prompt": "The Louvre is in \\ud83d", "target_new": "Vienna"}\n')  # a JSON escape
    err = expect_record_error(path, "s-1", "prompt")
    assert "lone surrogate (U+D83D" in str(err)
    recs = _zsre()
    recs[0]["alt"] = "\u200b"  # zero-width space only
    err = expect_record_error(recs, 0, "alt")
    assert "invisible" in str(err) and "U+200B" in str(err)
    recs = _flat()
    recs[0]["subject"] = "\ufeff"  # a byte-order mark
    expect_record_error(recs, 7, "subject")
    recs = _lit()
    recs[0]["target_new"] = "\u2060\u00ad"  # word joiner, soft hyphen
    expect_record_error(recs, "fx-0", "target_new")
    with pytest.raises(RecordError, match="field 'target_new'.*surrogate"):
        EditRequest(prompt="Paris is in", target_new="Fr\udc00", case_id=1).validate()
    assert load_requests([{"prompt": "Le Louvre est à", "target_new": "Wien \u200bX"}])  # visible text with a ZWSP is fine


def _set(path: str, value):
    """A mutation setting ``record[a][b]...`` (``path`` dotted) to ``value``."""

    def mutate(rec):
        *parents, last = path.split(".")
        for p in parents:
            rec = rec[p]
        rec[last] = value

    return mutate


# (schema, mutation, the field the error must name): every field read from a file, named as the file names it
FILE_FIELDS = [
    ("counterfact", _set("requested_rewrite.prompt", "The language of {} is\u200b {}"), "requested_rewrite.prompt"),
    ("counterfact", _set("requested_rewrite.prompt", ""), "requested_rewrite.prompt"),
    ("counterfact", _set("requested_rewrite.subject", " "), "requested_rewrite.subject"),
    ("counterfact", _set("requested_rewrite.subject", 4), "requested_rewrite.subject"),
    ("counterfact", _set("requested_rewrite.target_new.str", ""), "requested_rewrite.target_new.str"),
    ("counterfact", _set("requested_rewrite.target_new", "\u200b"), "requested_rewrite.target_new"),
    ("counterfact", _set("requested_rewrite.target_true.str", "\ufeff"), "requested_rewrite.target_true.str"),
    ("counterfact", _set("requested_rewrite.target_true.str", None), "requested_rewrite.target_true.str"),
    ("counterfact", _set("paraphrase_prompts", ["ok", " "]), "paraphrase_prompts[1]"),
    ("counterfact", _set("neighborhood_prompts", ["\u200b"]), "neighborhood_prompts[0]"),
    ("counterfact", _set("neighborhood_prompts", 5), "neighborhood_prompts"),
    ("counterfact_flat", _set("prompt", " "), "prompt"),
    ("counterfact_flat", _set("target_new", ["\u200b"]), "target_new[0]"),
    ("counterfact_flat", _set("ground_truth", ""), "ground_truth"),
    ("counterfact_flat", _set("ground_truth", [" "]), "ground_truth[0]"),
    ("counterfact_flat", _set("rephrase_prompt", " "), "rephrase_prompt"),
    ("counterfact_flat", _set("rephrase_prompt", ["a", "\u200b"]), "rephrase_prompt[1]"),
    ("counterfact_flat", _set("locality_prompt", " "), "locality_prompt"),
    ("counterfact_flat", _set("locality_ground_truth", "\u00ad"), "locality_ground_truth"),
    ("zsre", _set("src", "\u200b"), "src"),
    ("zsre", _set("alt", ""), "alt"),
    ("zsre", _set("alt", ["", "x"]), "alt[0]"),
    ("zsre", _set("answers", [" "]), "answers[0]"),
    ("zsre", _set("rephrase", " "), "rephrase"),
    ("zsre", _set("loc", " "), "loc"),
    ("zsre", _set("loc_ans", ""), "loc_ans"),
    ("zsre", _set("subject", "\u200b"), "subject"),
    ("wikibigedit", _set("update", " "), "update"),
    ("wikibigedit", _set("ans", "\u200b"), "ans"),
    ("wikibigedit", _set("rephrase", ["\u2060"]), "rephrase[0]"),
    ("wikibigedit", _set("personas", " "), "personas"),
    ("wikibigedit", _set("loc", [" "]), "loc[0]"),
    ("wikibigedit", _set("loc_ans", " "), "loc_ans"),
    ("wikibigedit", _set("mhop", "\u200b"), "mhop"),
    ("wikibigedit", _set("mhop_ans", [" "]), "mhop_ans[0]"),
    ("wikibigedit", _set("subject", " "), "subject"),
    ("lit_edit", _set("ground_truth", " "), "ground_truth"),
    ("lit_edit", _set("paraphrase_prompts", ["\u200b"]), "paraphrase_prompts[0]"),
    ("lit_edit", _set("locality", [{"prompt": "x", "answer": " "}]), "locality[0].answer"),
    ("lit_edit", _set("portability", [{"prompt": "x"}]), "portability[0].answer"),
    ("lit_edit", _set("locality", "The capital of Norway is"), "locality"),
]


@pytest.mark.parametrize(("schema", "mutate", "field"), FILE_FIELDS, ids=[f"{s}:{f}" for s, _, f in FILE_FIELDS])
def test_errors_name_the_files_own_field(schema, mutate, field):
    recs = raw_records(schema)
    mutate(recs[1])
    with pytest.raises(RecordError) as excinfo:
        load_requests(recs)
    assert excinfo.value.field == field, str(excinfo.value)
    assert f"field {field!r}" in str(excinfo.value)


# --------------------------------------------------------------------------- options


def test_load_requests_options_are_checked():
    path = FIXTURE_FILES["lit_edit"]
    with pytest.raises(ValueError, match="offset must be >= 0, got -1"):
        load_requests(path, offset=-1)  # would return the last record
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_requests(path, limit=-2)
    with pytest.raises(TypeError, match="limit must be an integer"):
        load_requests(path, limit="10")
    with pytest.raises(ValueError, match="unknown schema"):
        load_requests(path, schema=["zsre"])


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"eval_limit": -1}, ValueError, "eval_limit"),
        ({"eval_limit": 0}, ValueError, "eval_limit"),
        ({"offset": -1}, ValueError, "offset"),
        ({"limit": 0}, ValueError, "limit"),
        ({"batch_size": -1}, ValueError, "batch_size"),
        ({"batch_size": "16"}, TypeError, "batch_size"),
        ({"batch_size": 1.5}, TypeError, "batch_size"),
        ({"shuffle": "no"}, TypeError, "shuffle"),
        ({"seed": None}, TypeError, "seed"),
        ({"split": ""}, ValueError, "split"),
        ({"schema": "zsre"}, ValueError, "schema"),  # the demo set is in the lit_edit schema
        ({"path": "demo", "schema": "counterfact"}, ValueError, "schema"),
        ({"schema": "squad"}, ValueError, "schema"),
        ({"path": ""}, ValueError, "path"),
        ({"path": "  "}, ValueError, "path"),
        ({"path": 5}, TypeError, "path"),
        ({"requests": "edits.json"}, TypeError, "requests"),
    ],
)
def test_data_module_options_are_checked_at_construction(kwargs, error, name):
    from lit_edit.data import EditDataModule

    with pytest.raises(error, match=name):
        EditDataModule(**kwargs)


def test_data_module_schema_applies_to_given_records():
    from lit_edit.data import EditDataModule

    assert EditDataModule(schema="lit_edit").load() == demo_requests()
    assert len(EditDataModule(requests=_flat(), schema="counterfact_flat").load()) == 3


# --------------------------------------------------------------------------- length


def test_requests_longer_than_the_model_are_refused_naming_record_and_tokens(tokenizer, caplog):
    from types import SimpleNamespace

    from lit_edit.data import EditDataModule

    long = EditRequest(prompt="The Louvre is in " + "very " * 400 + "old", target_new="Vienna", case_id="long-1")
    reqs = [*demo_requests()[:2], long]
    editor = SimpleNamespace(tokenizer=tokenizer, model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256)))
    dm = EditDataModule(requests=reqs)
    dm.trainer = SimpleNamespace(lightning_module=editor)
    with pytest.raises(RecordError, match=r"record long-1: field 'prompt': is 40\d tokens long .* 256 positions"):
        dm.setup("fit")
    neighbour = EditRequest(prompt="Paris is in", target_new="France", locality=(PromptAnswer("x " * 300, "y"),), case_id=9)
    dm = EditDataModule(requests=[*demo_requests()[:2], neighbour])
    dm.trainer = SimpleNamespace(lightning_module=editor)
    with pytest.raises(RecordError, match=r"record 9: field 'locality\[0\]\.prompt'"):
        dm.setup("fit")
    dm = EditDataModule(requests=reqs, skip_invalid=True)
    dm.trainer = SimpleNamespace(lightning_module=editor)
    with caplog.at_level("WARNING", logger="lit_edit.data.datamodule"):
        dm.setup("fit")
    assert dm.load() == reqs[:2] and "long-1" in caplog.text
    dm = EditDataModule(requests=reqs)  # a model without a known number of positions: no check
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer, model=SimpleNamespace(config=None)))
    dm.setup("fit")


# --------------------------------------------------------------------------- real benchmark data


@pytest.mark.skipif(
    not (SHARED_DATA / "counterfact-edit-10k.json").is_file() or not (SHARED_DATA / "zsre-mend-1k.json").is_file(),
    reason=f"real benchmark data not found in {SHARED_DATA} (it is kept outside the repository)",
)
def test_real_benchmark_files():
    cf_raw = json.loads((SHARED_DATA / "counterfact-edit-10k.json").read_text())
    assert len(cf_raw) == 10_000 and detect_schema(cf_raw[0]) == "counterfact_flat"
    cf = load_requests(SHARED_DATA / "counterfact-edit-10k.json", limit=50)
    assert len(cf) == 50
    # the EasyEdit split keeps CounterFact's own case ids (not contiguous)
    assert [r.case_id for r in cf] == [rec["case_id"] for rec in cf_raw[:50]]
    assert len({r.case_id for r in cf}) == 50
    assert cf[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert (cf[0].subject, cf[0].target_new, cf[0].ground_truth) == ("Danielle Darrieux", "English", "French")
    assert cf[0].locality == (PromptAnswer("Michel Rocard is a native speaker of", "French"),)
    for r in cf:
        r.validate(require_subject=True)
        assert len(r.paraphrase_prompts) == 1 and len(r.locality) == 1
        assert r.target_new != r.ground_truth
        assert not r.target_new.startswith(" ")
    tail = load_requests(SHARED_DATA / "counterfact-edit-10k.json", offset=9990)
    assert [r.case_id for r in tail] == [rec["case_id"] for rec in cf_raw[9990:]]
    for r, rec in zip(cf, cf_raw):
        assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
            rec["prompt"],
            rec["subject"],
            rec["target_new"],
            rec["ground_truth"],
        )
        assert r.paraphrase_prompts == (rec["rephrase_prompt"],)
        assert r.locality == (PromptAnswer(rec["locality_prompt"], rec["locality_ground_truth"]),)

    raw = json.loads((SHARED_DATA / "zsre-mend-1k.json").read_text())
    assert len(raw) == 1000 and detect_schema(raw[0]) == "zsre"
    # two MEND records have an empty ``alt`` (no new target): strict loading names the first
    empty_alt = [i for i, rec in enumerate(raw) if not rec["alt"].strip()]
    assert empty_alt == [534, 723]
    expect_record_error(SHARED_DATA / "zsre-mend-1k.json", 534, "alt")
    zs = load_requests(SHARED_DATA / "zsre-mend-1k.json", require_subject=True, skip_invalid=True)
    assert len(zs) == 998
    assert [r.case_id for r in zs] == [i for i in range(1000) if i not in empty_alt]
    for r in zs:
        rec = raw[r.case_id]
        assert r.prompt == rec["src"] and r.subject == rec["subject"]
        assert r.target_new == rec["alt"] and r.ground_truth == rec["answers"][0]
        assert r.paraphrase_prompts == (rec["rephrase"],)
        assert r.locality == (PromptAnswer(rec["loc"], rec["loc_ans"]),)
        assert r.portability == ()


@pytest.mark.skipif(
    not all((SHARED_DATA / f).is_file() for f in ("counterfact-edit-10k.json", "zsre-mend-1k.json", "wikibigedit-1500.json")),
    reason=f"real benchmark data not found in {SHARED_DATA} (it is kept outside the repository)",
)
def test_real_benchmarks_by_name(monkeypatch):
    monkeypatch.setenv("LIT_EDIT_DATA", str(SHARED_DATA))  # as tests/conftest.py sets it by default
    assert load_requests("counterfact", limit=20) == load_requests(SHARED_DATA / "counterfact-edit-10k.json", limit=20)
    assert load_requests("zsre", limit=20) == load_requests(SHARED_DATA / "zsre-mend-1k.json", limit=20)
    wbe = load_requests("wikibigedit", offset=1490)
    assert len(wbe) == 10 and all(r.ground_truth is None and r.locality for r in wbe)
