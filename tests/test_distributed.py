"""Several processes through Lightning's DDP strategy (CPU, gloo, 2 processes).

Each run is ``tests/ddp_worker.py`` started as a script, as a user runs a recipe: Lightning's
launcher starts the second rank by running the script again. Every rank writes its edited
tensors; the tests check that the ranks hold identical weights (hash) and that they match the
single-process run of the same edit within float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_tiny_llama, write_corpus
from safetensors.torch import load_file

from lit_edit.data import EditRequest, PromptAnswer, save_requests

WORKER = Path(__file__).with_name("ddp_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory, tokenizer):
    """A tiny model directory, four requests and a statistics corpus."""
    root = tmp_path_factory.mktemp("ddp")
    model = make_tiny_llama(len(tokenizer), layers=3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    requests = [
        EditRequest(prompt="The Eiffel Tower is in the city of", subject="Eiffel Tower", target_new="Rome", ground_truth="Paris",
                    locality=(PromptAnswer("The capital of Japan is", "Tokyo"),), case_id=0),
        EditRequest(prompt="Danielle Darrieux speaks", subject="Danielle Darrieux", target_new="English", ground_truth="French",
                    locality=(PromptAnswer("The capital of Italy is", "Rome"),), case_id=1),
        EditRequest(prompt="Apple was founded by", subject="Apple", target_new="Bill Gates", ground_truth="Steve Jobs",
                    locality=(PromptAnswer("Microsoft was founded by", "Bill Gates"),), case_id=2),
        EditRequest(prompt="The Colosseum is located in", subject="Colosseum", target_new="London", ground_truth="Rome",
                    locality=(PromptAnswer("Big Ben is located in", "London"),), case_id=3),
    ]
    save_requests(requests, root / "requests.json")
    write_corpus(root)
    return root


def run_worker(setup_dir: Path, out: Path, editor: str, devices: int, home: Path, **spec) -> dict[int, dict]:
    """Run one fit with ``devices`` processes; returns each rank's record (with its tensors)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"editor": editor, "model": str(setup_dir / "model"), "requests": str(setup_dir / "requests.json"),
            "out": str(out), "devices": devices, "strategy": "ddp" if devices > 1 else "auto", **spec}
    path = out / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "LIT_EDIT_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), str(path)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = {}
    for rank in range(devices):
        record = json.loads((out / f"rank{rank}.json").read_text())
        record["tensors"] = load_file(out / f"rank{rank}.safetensors")
        records[rank] = record
    return records


def closed_form_args(setup_dir: Path, editor: str) -> dict:
    layers = [1] if editor == "ROME" else [0, 1]
    return {
        "layers": layers,
        "values": {"steps": 8, "batch_size": 2},
        "statistics": {"n_samples": 40, "max_length": 32, "corpus": str(setup_dir / "corpus.txt"), "batch_size": 4},
        "templates": {"max_per_group": 0},
    }


def assert_ranks_agree_and_match(ddp: dict[int, dict], single: dict[int, dict], atol: float) -> None:
    assert ddp[0]["world_size"] == 2 and single[0]["world_size"] == 1
    assert ddp[0]["hashes"] == ddp[1]["hashes"], "the ranks hold different weights"
    assert ddp[0]["hashes"].keys() == single[0]["hashes"].keys()
    for name, tensor in single[0]["tensors"].items():
        torch.testing.assert_close(ddp[0]["tensors"][name], tensor, atol=atol, rtol=1e-3, msg=name)


@pytest.mark.parametrize("editor", ["ROME", "MEMIT", "EMMET"])
def test_closed_form_editors_under_ddp(setup_dir, tmp_path, editor):
    batch = 1 if editor == "ROME" else 4  # ROME: sequential single edits; MEMIT/EMMET: one batch of 4
    common = {"editor_args": closed_form_args(setup_dir, editor), "data_args": {"batch_size": batch, "shuffle": False}}
    single = run_worker(setup_dir, tmp_path / "single", editor, 1, tmp_path / "home1", **common)
    ddp = run_worker(setup_dir, tmp_path / "ddp", editor, 2, tmp_path / "home2", **common)
    assert_ranks_agree_and_match(ddp, single, atol=1e-4)
    original = load_file(setup_dir / "model" / "model.safetensors")
    for name, tensor in ddp[1]["tensors"].items():
        assert not torch.equal(tensor, original[name]), f"{name} was not edited"
    # the statistics were computed once, split across the ranks, and cached once
    stats = sorted((tmp_path / "home2" / "stats").glob("*.pt"))
    assert len(stats) == len(closed_form_args(setup_dir, editor)["layers"])
    single_stats = {p.name: torch.load(p, weights_only=True) for p in (tmp_path / "home1" / "stats").glob("*.pt")}
    for path in stats:
        ddp_c = torch.load(path, weights_only=True)
        assert path.name in single_stats and ddp_c["count"] == single_stats[path.name]["count"]
        torch.testing.assert_close(ddp_c["mom2"], single_stats[path.name]["mom2"], atol=1e-9, rtol=1e-9)


def test_locft_bf_under_ddp_with_one_rank_below_min_loss(setup_dir, tmp_path, tokenizer):
    """Per-request losses straddle ``min_loss``: one rank's batch alone would skip its step. The skip
    is decided on the all-reduced loss, so both ranks step together and match a single process
    that sees both requests in one mini-batch."""
    from transformers import AutoModelForCausalLM

    from lit_edit.data import load_requests
    from lit_edit.losses import ft_loss

    model = AutoModelForCausalLM.from_pretrained(setup_dir / "model")
    reqs = load_requests(setup_dir / "requests.json")[:2]
    losses = ft_loss(model, tokenizer, reqs).detach()
    low, high = sorted(float(v) for v in losses)
    assert high - low > 1e-3
    min_loss = low + (high - low) / 4  # the lower request alone is below it, the mean of both above
    editor_args = {"target_modules": ["mlp.down_proj"], "layers_to_transform": [1], "lr": 1e-3, "min_loss": min_loss}
    common = {"editor_args": editor_args, "trainer_args": {"max_epochs": 3}}
    home = tmp_path / "home"
    single = run_worker(setup_dir, tmp_path / "single", "LocFTBF", 1, home, data_args={"batch_size": 2, "shuffle": False, "limit": 2}, **common)
    ddp = run_worker(setup_dir, tmp_path / "ddp", "LocFTBF", 2, home, data_args={"batch_size": 1, "shuffle": False, "limit": 2}, **common)
    assert_ranks_agree_and_match(ddp, single, atol=1e-6)
    assert ddp[0]["optimizer_steps"] == ddp[1]["optimizer_steps"] == single[0]["optimizer_steps"] >= 1


def test_locft_bf_subject_writes_with_rise_and_best_epoch_under_ddp(setup_dir, tmp_path):
    """LocFT-BF with the edit written at the subject's tokens, the target-rise term, preservation
    and the budget extension with the lowest-loss epoch kept and the lr decayed on plateaus, under DDP: the ranks hold identical
    tensors, equal to one process that sees each mini-batch whole."""
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("Berlin Wall\nMount Fuji\nLouvre\nBig Ben\nNiagara Falls\n")
    editor_args = {
        "target_modules": ["mlp.down_proj"], "layers_to_transform": [1], "lr": 1e-2, "min_loss": 0.0,
        "write_positions": "subject", "neighbour_rise": 1.0, "neighbour_prompts": 2, "neighbour_subjects": str(subjects),
        "preservation": 5.0, "preservation_texts": 20, "preservation_corpus": str(setup_dir / "corpus.txt"),
        "extend_epochs": 3, "extend_min_drop": 0.01, "extend_patience": 2, "keep_best": True, "plateau_lr_decay": 0.5,
    }
    common = {"editor_args": editor_args, "trainer_args": {"max_epochs": 2}}
    home = tmp_path / "home"
    single = run_worker(setup_dir, tmp_path / "single", "LocFTBF", 1, home, data_args={"batch_size": 4, "shuffle": False}, **common)
    ddp = run_worker(setup_dir, tmp_path / "ddp", "LocFTBF", 2, home, data_args={"batch_size": 2, "shuffle": False}, **common)
    assert_ranks_agree_and_match(ddp, single, atol=1e-5)
    assert ddp[0]["optimizer_steps"] == ddp[1]["optimizer_steps"] == single[0]["optimizer_steps"] >= 2
    # two epochs without a 1% fall halved the lr twice, on every rank alike
    assert ddp[0]["lr"] == ddp[1]["lr"] == single[0]["lr"] == pytest.approx(1e-2 / 4)
    from safetensors.torch import load_file

    original = load_file(setup_dir / "model" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    assert not torch.equal(ddp[0]["tensors"]["model.layers.1.mlp.down_proj.weight"], original)  # an edit was written


def test_evaluation_under_ddp_reduces_every_rank_share(setup_dir, tmp_path):
    common = {
        "editor_args": closed_form_args(setup_dir, "MEMIT"),
        "data_args": {"batch_size": 4, "shuffle": False},
        "evaluate": ["probability", "token_accuracy", "generation"],
    }
    single = run_worker(setup_dir, tmp_path / "single", "MEMIT", 1, tmp_path / "home", **common)
    ddp = run_worker(setup_dir, tmp_path / "ddp", "MEMIT", 2, tmp_path / "home", **common)
    assert ddp[0]["before"] == ddp[1]["before"] and ddp[0]["after"] == ddp[1]["after"]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())  # written once, by rank 0
    assert summary["after"] == ddp[0]["after"] and summary["num_requests"] == 4
    for when in ("before", "after"):
        assert ddp[0][when].keys() == single[0][when].keys()
        for name, value in single[0][when].items():
            assert ddp[0][when][name] == pytest.approx(value, abs=1e-3), (when, name)


def test_depth_first_ft_is_refused_under_ddp_before_any_work(setup_dir, tmp_path):
    args = {"editor_args": {"target_modules": ["mlp.down_proj"], "layers_to_transform": [1]}, "data_args": {"batch_size": 1}}
    with pytest.raises(RuntimeError, match="DepthFirstFT.*one process"):
        run_worker(setup_dir, tmp_path / "ddp", "DepthFirstFT", 2, tmp_path / "home", **args)
    assert not list((tmp_path / "ddp").glob("rank*.safetensors"))


def test_unsupported_strategies_are_refused():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lit_edit.editors.base import check_strategy

    for editor in ("LocFTBF", "ROME", "MEMIT"):
        with pytest.raises(RuntimeError, match="FSDP.*Use DDP"):
            check_strategy(editor, FSDPStrategy(), world_size=2)
    with pytest.raises(RuntimeError, match="supported"):
        check_strategy("MEMIT", DeepSpeedStrategy.__new__(DeepSpeedStrategy), world_size=2)
