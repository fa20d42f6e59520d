"""Saved edits and exports: where they may be written, crash safety, validation before any write, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama

from lit_edit.edits import (
    EditFormatError,
    EditMismatchError,
    SavePathError,
    apply_edit,
    file_sha256,
    load_edit,
    read_edit,
    tensor_sha256,
    write_edit,
)
from lit_edit.io import atomic_directory

DOWN1 = "model.layers.1.mlp.down_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
VOCAB = 64


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_params(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def edited_values(model, names=(UP0, DOWN1), shift=0.5):
    p = dict(model.named_parameters())
    return {n: p[n].detach() + shift for n in names}, {n: p[n].detach().clone() for n in names}


def save(directory, model=None, shift=0.5, **kw) -> Path:
    model = model if model is not None else make_tiny_llama(VOCAB)
    edited, originals = edited_values(model, shift=shift)
    return write_edit(directory, edited, originals, base_model="tiny-llama-seed0", editor="test", init_args={}, **kw)


def tamper(directory: Path, change, describe: bool = True) -> None:
    """Rewrite an edit the way a careless tool would: new tensors with recomputed hashes (so the hash checks pass);
    ``describe=False`` leaves the recorded shape and dtype as they were."""
    from safetensors.torch import save_file

    meta, tensors = read_edit(directory)
    change(tensors)
    described, spare = meta["tensors"], [info for n, info in meta["tensors"].items() if n not in tensors]
    meta["tensors"] = {}
    for name, t in tensors.items():  # a renamed tensor keeps its description
        info = dict(described[name] if name in described else spare.pop())
        info.update(edited_sha256=tensor_sha256(t))
        if describe:
            info.update(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""))
        meta["tensors"][name] = info
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "edit.safetensors"))
    meta["tensors_file_sha256"] = file_sha256(directory / "edit.safetensors")
    (directory / "edit.json").write_text(json.dumps(meta))


def editor_on(model, tokenizer):
    from lit_edit.editors import LocFTBF

    return LocFTBF(model=model, tokenizer=tokenizer, target_modules=["mlp.down_proj"], layers_to_transform=[1], lr=1e-2)


def touch_and_shift(ed, value=0.25):
    ed.touch([DOWN1])
    with torch.no_grad():
        dict(ed.model.named_parameters())[DOWN1].add_(value)


# ---------------------------------------------------------------------- 1. what a save may replace


def test_save_never_writes_into_a_directory_of_other_files(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(SavePathError, match="not a lit_edit edit") as e:
            save(target, overwrite=overwrite)
        assert str(target) in str(e.value)
    assert sorted(os.listdir(target)) == ["notes.txt"] and (target / "notes.txt").read_text() == "my notes"


def test_overwrite_is_explicit_and_keeps_the_users_files(tmp_path):
    target = save(tmp_path / "edit", shift=0.5)
    (target / "notes.txt").write_text("my notes")
    _, first = read_edit(target)
    with pytest.raises(SavePathError, match="overwrite=True") as e:
        save(target, shift=1.5)
    assert str(target) in str(e.value)
    assert all(torch.equal(first[n], t) for n, t in read_edit(target)[1].items())  # untouched
    save(target, shift=1.5, overwrite=True)
    _, second = read_edit(target)
    assert not torch.equal(second[DOWN1], first[DOWN1])
    assert sorted(os.listdir(target)) == ["edit.json", "edit.safetensors", "notes.txt"]  # no leftovers, notes kept
    assert (target / "notes.txt").read_text() == "my notes"


def test_a_file_is_never_replaced_by_a_directory(tmp_path):
    path = tmp_path / "edit"
    path.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(SavePathError, match="regular file"):
            save(path, overwrite=overwrite)
    with pytest.raises(SavePathError, match="regular file") as e:  # and nothing under a file
        save(path / "sub", overwrite=True)
    assert str(path) in str(e.value)
    assert path.read_text() == "a file"


def test_an_edit_json_of_another_tool_is_never_replaced(tmp_path):
    target = tmp_path / "other"
    target.mkdir()
    (target / "edit.json").write_text('{"format": "someone-else/3"}')
    with pytest.raises(SavePathError, match="not a lit_edit edit description"):
        save(target, overwrite=True)
    assert (target / "edit.json").read_text() == '{"format": "someone-else/3"}'


def test_empty_directory_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    read_edit(save(tmp_path / "empty"))


def test_atomic_directory_never_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
    assert os.listdir(target) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary sibling left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_directory(tmp_path / "file"):
            pass
    with atomic_directory(tmp_path / "new") as tmp:  # a new directory is still written atomically
        (tmp / "a").write_text("1")
    assert (tmp_path / "new" / "a").read_text() == "1"


def test_export_rules_match_the_edit_rules(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(len(tokenizer))
    ed = editor_on(model, tokenizer)
    touch_and_shift(ed, 0.25)
    out = ed.export(tmp_path / "merged")
    assert (out / "lit_edit_export.json").is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SavePathError, match="overwrite=True") as e:
        ed.export(out)
    assert str(out) in str(e.value)
    touch_and_shift(ed, 0.25)
    ed.export(out, overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(dict(reloaded.named_parameters())[DOWN1], dict(model.named_parameters())[DOWN1])
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary leftovers

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(SavePathError, match="not a lit_edit export"):
        ed.export(foreign, overwrite=True)
    assert os.listdir(foreign) == ["config.json"] and (foreign / "config.json").read_text() == "{}"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SavePathError, match="regular file"):
        ed.export(tmp_path / "afile", overwrite=True)


# ---------------------------------------------------------------------- 2. a killed save


KILL_SCRIPT = r'''
import json, os, shutil, signal, sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # the forked savers must not inherit an intra-op thread pool
from lit_edit.edits import write_edit

work = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
originals = {"a.weight": torch.randn(16, 8, generator=g), "b.bias": torch.randn(5, generator=g)}
old = {k: v + 1 for k, v in originals.items()}
new = {k: v * 3 for k, v in originals.items()}
torch.save({"old": old, "new": new}, work / "expected.pt")
target = work / "edit"
results = []
for point in range(1, 100):
    shutil.rmtree(target, ignore_errors=True)
    write_edit(target, old, originals, "base", "test", {})
    (target / "notes.txt").write_text("the user's notes")
    pid = os.fork()
    if pid == 0:  # the saving process: SIGKILLed just before its point-th file-system call of these kinds
        calls = [0]

        def hook(fn):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == point:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)
            return wrapped

        for name in ("replace", "rename", "link", "unlink", "fsync"):
            setattr(os, name, hook(getattr(os, name)))
        try:
            write_edit(target, new, originals, "base", "test", {}, overwrite=True)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    shutil.copytree(target, work / f"after-{point}", symlinks=True)
    results.append({"point": point, "killed": killed, "status": status, "saver_pid": pid})
    if not killed:
        break
print(json.dumps(results))
'''


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks the saving processes")
def test_killed_save_always_leaves_a_readable_edit_and_the_users_files(tmp_path, caplog):
    script = tmp_path / "kill_save.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[-1]["status"] == 0 and not results[-1]["killed"], results[-1]  # the save finally ran to the end
    assert len(results) >= 6, results  # killed before every rename, link, fsync and removal of the save
    expected = torch.load(tmp_path / "expected.pt")
    for r in results:  # a copy of each state for the next save, below
        shutil.copytree(tmp_path / f"after-{r['point']}", tmp_path / f"save-{r['point']}")
    seen = []
    for r in results:
        d = tmp_path / f"after-{r['point']}"
        left = [p for p in os.listdir(d) if p.startswith(".")]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lit_edit"):
            meta, tensors = read_edit(d)
        which = [k for k in ("old", "new") if tensors.keys() == expected[k].keys()
                 and all(torch.equal(tensors[n], expected[k][n]) and tensors[n].dtype == expected[k][n].dtype for n in tensors)]
        assert which, f"kill point {r['point']}: neither the old nor the new edit"
        seen.append(which[0])
        assert meta["tensors"]["a.weight"]["edited_sha256"] == tensor_sha256(tensors["a.weight"])
        assert (d / "notes.txt").read_text() == "the user's notes"
        assert sorted(os.listdir(d)) == ["edit.json", "edit.safetensors", "notes.txt"], (r, os.listdir(d))
        records = [rec for rec in caplog.records if rec.name.startswith("lit_edit")]
        assert len(records) == (1 if left else 0), (r, left, [rec.getMessage() for rec in records])
        if left:
            assert str(d) in records[0].getMessage() and "interrupted lit_edit save" in records[0].getMessage()
    assert seen[0] == "old" and seen[-1] == "new" and "old" in seen[:-1], seen  # kills on both sides of the commit

    # the next save over a directory a killed save left cleans it up the same way (one log line)
    for r in results:
        d = tmp_path / f"save-{r['point']}"
        left = [p for p in os.listdir(d) if p.startswith(".")]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lit_edit"):
            write_edit(d, expected["old"], expected["old"], "base", "test", {}, overwrite=True)
        assert sorted(os.listdir(d)) == ["edit.json", "edit.safetensors", "notes.txt"]
        assert len([rec for rec in caplog.records if rec.name.startswith("lit_edit")]) == (1 if left else 0)
        assert all(torch.equal(t, expected["old"][n]) for n, t in read_edit(d)[1].items())


def test_leftovers_of_a_running_save_and_other_files_are_never_removed(tmp_path, caplog):
    target = save(tmp_path / "edit")
    mine = [
        target / f".edit.safetensors.{os.getpid()}.abcd1234.tmp",  # this (running) process's temporary file
        target / ".edit.json.swp",  # an editor's swap file
        target / ".notes.txt.999999.abcd.tmp",  # a name lit_edit never writes
        target / "edit.json.bak",
    ]
    for p in mine:
        p.write_text("keep me")
    dead = target / ".edit.json.999999999.dead0001.tmp"  # a pid that cannot exist
    dead.write_text("{}")
    with caplog.at_level(logging.WARNING, logger="lit_edit"):
        save(target, shift=2.0, overwrite=True)
    assert not dead.exists()
    assert all(p.read_text() == "keep me" for p in mine)
    assert len([r for r in caplog.records if "interrupted lit_edit save" in r.getMessage()]) == 1


def test_a_torn_pair_reads_the_previous_tensors(tmp_path):
    """edit.safetensors replaced but edit.json not yet: the reader uses the kept previous tensors."""
    target = save(tmp_path / "edit", shift=0.5)
    _, old = read_edit(target)
    other = save(tmp_path / "other", shift=1.5)
    backup = target / ".edit.safetensors.999999999.abcd0001.old"
    os.link(target / "edit.safetensors", backup)
    os.replace(other / "edit.safetensors", target / "edit.safetensors")
    _, tensors = read_edit(target)
    assert all(torch.equal(tensors[n], old[n]) for n in old)
    assert not backup.exists() and sorted(os.listdir(target)) == ["edit.json", "edit.safetensors"]
    # without the previous copy, the damage is reported with the file names
    os.replace(save(tmp_path / "third", shift=3.0) / "edit.safetensors", target / "edit.safetensors")
    with pytest.raises(EditFormatError, match="does not match") as e:
        read_edit(target)
    assert str(target / "edit.safetensors") in str(e.value)


# ---------------------------------------------------------------------- 3. validation before the first write


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda t: t.__setitem__(DOWN1, t[DOWN1][:, :-1].clone()), "shapes must be equal"),  # the second tensor's shape
        (lambda t: t.__setitem__(DOWN1, t[DOWN1][:1].clone()), "shapes must be equal"),  # broadcastable
        (lambda t: t.__setitem__(DOWN1, t[DOWN1].double()), "dtypes"),
        (lambda t: t[DOWN1].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda t: t[DOWN1].__setitem__((0, 0), float("inf")), "non-finite"),
    ],
    ids=["shape", "broadcastable", "dtype", "nan", "inf"],
)
@pytest.mark.parametrize("describe", [True, False], ids=["described", "only-rehashed"])
def test_apply_edit_checks_every_tensor_before_the_first_write(tmp_path, change, error, describe):
    target = save(tmp_path / "edit")
    tamper(target, change, describe=describe)
    model = make_tiny_llama(VOCAB)
    before = params(model)
    with pytest.raises(ValueError, match=error if describe or error == "non-finite" else "stored as") as e:
        apply_edit(model, target)
    assert DOWN1 in str(e.value)
    assert same_params(model, before)  # the first tensor (UP0) was not written either


def test_apply_edit_refuses_an_unknown_tensor_name_before_writing(tmp_path):
    target = save(tmp_path / "edit")
    tamper(target, lambda t: t.__setitem__("model.layers.9.mlp.down_proj.weight", t.pop(DOWN1)))
    model = make_tiny_llama(VOCAB)
    before = params(model)
    with pytest.raises(EditMismatchError, match="no tensor"):
        apply_edit(model, target)
    assert same_params(model, before)


def test_save_and_export_refuse_non_finite_values(tmp_path, tokenizer):
    model = make_tiny_llama(len(tokenizer))
    ed = editor_on(model, tokenizer)
    touch_and_shift(ed)
    with torch.no_grad():
        dict(model.named_parameters())[DOWN1][3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite") as e:
        ed.save_edit(tmp_path / "edit")
    assert DOWN1 in str(e.value) and not (tmp_path / "edit").exists()
    with pytest.raises(ValueError, match="non-finite") as e:
        ed.export(tmp_path / "merged")
    assert DOWN1 in str(e.value) and not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------- 4. clear errors


def test_unreadable_tensors_file_is_named(tmp_path):
    target = save(tmp_path / "edit")
    (target / "edit.safetensors").write_bytes(b"\xff" * 64)
    meta = json.loads((target / "edit.json").read_text())
    meta["tensors_file_sha256"] = file_sha256(target / "edit.safetensors")
    (target / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditFormatError, match="not a readable safetensors file") as e:
        read_edit(target)
    assert str(target / "edit.safetensors") in str(e.value)
    del meta["tensors_file_sha256"]  # an edit written before the file hash was recorded
    (target / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditFormatError, match="not a readable safetensors file"):
        read_edit(target)


@pytest.mark.parametrize("key", ["base_model", "tensors", "format", "editor"])
def test_missing_key_names_the_file_and_key(tmp_path, key):
    target = save(tmp_path / "edit")
    meta = json.loads((target / "edit.json").read_text())
    del meta[key]
    (target / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditFormatError) as e:
        read_edit(target)
    assert str(target / "edit.json") in str(e.value) and (repr(key) in str(e.value) or key == "format")


def test_missing_tensor_key_empty_tensors_and_bad_json(tmp_path):
    target = save(tmp_path / "edit")
    meta = json.loads((target / "edit.json").read_text())
    del meta["tensors"][DOWN1]["original_sha256"]
    (target / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditFormatError, match=f"tensor '{DOWN1}' lacks the key 'original_sha256'"):
        read_edit(target)
    meta["tensors"] = {}
    (target / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(EditFormatError, match="'tensors' is empty"):
        read_edit(target)
    with pytest.raises(EditFormatError, match="'tensors' is empty"):  # not StopIteration
        load_edit(target)
    (target / "edit.json").write_text("{not json")
    with pytest.raises(EditFormatError, match="not valid JSON") as e:
        read_edit(target)
    assert str(target / "edit.json") in str(e.value)


def test_old_edits_without_the_file_hash_still_load_and_are_overwritten_safely(tmp_path):
    target = save(tmp_path / "edit", shift=0.5)
    meta = json.loads((target / "edit.json").read_text())
    del meta["tensors_file_sha256"]
    (target / "edit.json").write_text(json.dumps(meta))
    model = make_tiny_llama(VOCAB)
    apply_edit(model, target)
    save(target, shift=1.5, overwrite=True)
    assert "tensors_file_sha256" in json.loads((target / "edit.json").read_text())


def test_init_args_are_plain_json(tmp_path, tokenizer):
    ed = editor_on(make_tiny_llama(len(tokenizer)), tokenizer)
    touch_and_shift(ed)
    meta, _ = read_edit(ed.save_edit(tmp_path / "edit"))
    assert meta["init_args"]["lr"] == 1e-2 and meta["init_args"]["target_modules"] == ["mlp.down_proj"]
    json.dumps(meta["init_args"])



def test_saving_an_edit_that_changes_nothing_warns(tokenizer, tmp_path, caplog):
    import logging

    from helpers import make_tiny_llama

    from lit_edit.editors import LocFTBF

    editor = LocFTBF(model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, target_modules=["mlp.down_proj"], layers_to_transform=[1])
    editor.prepare_for_editing()  # tensors recorded, no step taken (as a fit of zero epochs)
    with caplog.at_level(logging.WARNING, logger="lit_edit"):
        editor.save_edit(tmp_path / "edit")
    assert "changes nothing" in caplog.text
    caplog.clear()
    with torch.no_grad():
        editor.model.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    with caplog.at_level(logging.WARNING, logger="lit_edit"):
        editor.save_edit(tmp_path / "edit", overwrite=True)
    assert "changes nothing" not in caplog.text
