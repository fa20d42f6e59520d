"""The config hub (lit_edit/config_hub): every file is valid for its editor, models are recognised
by name or architecture signature (never by type and depth alone), and the editors resolve their
settings as explicit argument > the model's hub file > the hub's generic defaults.

Models of the real sizes are built on the meta device (configs only, no weights).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml

from lit_edit import config_hub as hub
from lit_edit.config_hub import SIGNATURE_FIELDS, editor_class, hub_settings, identify, list_hub, model_signature

SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}


def _config(signature: dict, name: str = ""):
    """A transformers config with ``signature`` (GPT-2/GPT-J fields through their own names)."""
    from transformers import AutoConfig

    sig = dict(signature)
    model_type = sig.pop("model_type")
    if model_type in ("gpt2", "gptj"):
        kv, heads = sig.pop("num_key_value_heads"), sig["num_attention_heads"]
        assert kv == heads
        inner = sig.pop("intermediate_size")
        cfg = AutoConfig.for_model(
            model_type,
            n_embd=sig["hidden_size"],
            n_layer=sig["num_hidden_layers"],
            n_head=heads,
            vocab_size=sig["vocab_size"],
            n_inner=None if inner == 4 * sig["hidden_size"] else inner,
        )
    else:
        cfg = AutoConfig.for_model(model_type, **sig)
    cfg.name_or_path = name
    return cfg


def _meta_llama(name: str = "", **overrides):
    """A Llama of SmolLM2-135M's architecture (or ``overrides``) on the meta device."""
    from transformers import LlamaForCausalLM

    cfg = _config({**SMOLLM2, **overrides}, name)
    cfg.tie_word_embeddings = True
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.eval()


def _init_params(cls) -> dict[str, tuple[inspect.Parameter, object]]:
    """Named ``__init__`` parameters of ``cls`` with their type hints, following ``**kwargs`` up the MRO."""
    params: dict[str, tuple[inspect.Parameter, object]] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        hints = typing.get_type_hints(klass.__init__)
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, (p, hints.get(name)))
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def _hub_files() -> list[Path]:
    return sorted(p for p in hub.HUB_DIR.rglob("*.yaml") if p.name != hub.MODEL_FILE)


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


# --------------------------------------------------------------------------- the files


@pytest.mark.parametrize("path", _hub_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_hub_key_is_an_argument_its_editor_leaves_to_the_hub(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path} is empty"
    cls = editor_class(path.stem)
    params = _init_params(cls)
    for key, value in data.items():
        if key == "at_subject" and path.stem in ("locft_bf", "depth_first_ft") and path.parent.name != hub.DEFAULTS:
            # the location and lr for writes at the subject's tokens (FineTuneEditor.hub_settings)
            assert isinstance(value, dict) and value and set(value) <= {"target_modules", "layers_to_transform", "lr"}, (
                f"{path}: at_subject holds target_modules, layers_to_transform and lr only, got {value!r}")
            for sub, v in value.items():
                assert _matches(v, params[sub][1]), f"{path}: at_subject.{sub} = {v!r} is not a {params[sub][1]}"
            continue
        assert key in params, f"{path}: {key!r} is not an argument of {cls.__name__}"
        default, hint = params[key][0].default, params[key][1]
        if dataclasses.is_dataclass(default):
            assert isinstance(value, dict), f"{path}: {key} must be a mapping of {type(default).__name__} fields"
            field_hints = typing.get_type_hints(type(default))
            fields = {f.name: f for f in dataclasses.fields(default)}
            for sub, v in value.items():
                assert sub in fields, f"{path}: {key}.{sub} is not a field of {type(default).__name__}"
                assert fields[sub].default is None, f"{path}: {key}.{sub} is not a per-model (None = hub) field"
                assert _matches(v, field_hints[sub]), f"{path}: {key}.{sub} = {v!r} is not a {field_hints[sub]}"
        else:
            assert default is None, f"{path}: {key!r} is not a per-model (None = hub) argument"
            assert _matches(value, hint), f"{path}: {key} = {value!r} is not a {hint}"
    # a model's file may set anything its editor's generic defaults set, plus its location
    if path.parent.name != hub.DEFAULTS:
        assert (hub.HUB_DIR / hub.DEFAULTS / path.name).is_file(), f"no generic defaults for {path.stem}"


def test_model_files_and_recognition_of_every_model():
    models = list_hub()
    assert {"smollm2-135m", "llama-3-8b", "qwen2.5-7b", "mistral-7b", "gpt2-xl", "gpt-j-6b"} <= set(models)
    assert hub.DEFAULTS not in models
    signatures, names = {}, {}
    for model in models:
        spec = yaml.safe_load((hub.HUB_DIR / model / "model.yaml").read_text())
        assert set(spec["signature"]) == set(SIGNATURE_FIELDS)
        key = tuple(spec["signature"][k] for k in SIGNATURE_FIELDS)
        assert key not in signatures, f"{model} and {signatures[key]} share a signature"
        signatures[key] = model
        for n in spec["names"]:
            assert n.lower() not in names, f"{n} names both {model} and {names[n.lower()]}"
            names[n.lower()] = model
            assert identify(_config(spec["signature"], n)) == model
        # a local copy under another path: recognised by its architecture
        assert identify(_config(spec["signature"], "/data/models/my-copy")) == model
        assert model_signature(_config(spec["signature"])) == spec["signature"]
    # the published sizes of the 7-8B and GPT models
    assert identify(_config(dict(SMOLLM2, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
                            "meta-llama/Meta-Llama-3-8B-Instruct")) == "llama-3-8b"
    from transformers import GPT2Config, GPTJConfig

    assert identify(GPT2Config(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257)) == "gpt2-xl"
    assert identify(GPTJConfig()) == "gpt-j-6b"  # GPTJConfig's defaults are GPT-J-6B's


def test_smollm2_signature_is_the_real_config():
    path = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m" / "config.json"
    if not path.exists():
        pytest.skip("embedded model not converted")
    real = json.loads(path.read_text())
    spec = yaml.safe_load((hub.HUB_DIR / "smollm2-135m" / "model.yaml").read_text())
    assert spec["signature"] == {k: real[k] for k in SIGNATURE_FIELDS}
    assert spec["signature"] == SMOLLM2


def test_same_type_and_depth_with_other_sizes_is_not_recognised(caplog):
    other = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
    assert identify(_config({**SMOLLM2, **other})) is None
    assert identify(_config({**SMOLLM2, "vocab_size": 32000}, "my-30-block-llama")) is None
    with caplog.at_level(logging.WARNING, logger="lit_edit.config_hub"):
        assert identify(_config({**SMOLLM2, **other}, "HuggingFaceTB/SmolLM2-135M")) is None
    assert "architecture differs" in caplog.text and "hidden_size 512 (hub 576)" in caplog.text


def test_unknown_editor_key_is_refused():
    with pytest.raises(KeyError, match="no editor 'romee'"):
        hub_settings(_meta_llama(), "romee")


# --------------------------------------------------------------------------- editors on SmolLM2-135M


@pytest.mark.parametrize("name", ["", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "/tmp/resaved-copy"])
def test_smollm2_resolves_to_its_hub_values(tokenizer, name, caplog):
    from lit_edit.closed_form import ValueSettings
    from lit_edit.editors import EMMET, MEMIT, ROME, DepthFirstFT, LocFTBF

    model = _meta_llama(name)
    assert identify(model) == "smollm2-135m"
    rome = ROME(model=model, tokenizer=tokenizer)
    s = rome.settings
    assert s.hub_model == "smollm2-135m" and s.layers == [4] == rome.edit_layers
    assert rome.value_settings() == ValueSettings(lr=0.5, steps=25, kl_factor=0.0625, weight_decay=1e-3,
                                                  clamp_norm_factor=4.0, loss_tol=5e-2)
    for cls in (MEMIT, EMMET):
        ed = cls(model=model, tokenizer=tokenizer)
        s = ed.settings
        assert s.layers == [3, 4, 5]
        assert (s.values.lr, s.values.steps, s.values.weight_decay, s.values.clamp_norm_factor) == (0.5, 25, 1e-3, 4.0)
        assert s.statistics.update_weight == 500.0 == ed.update_weight()
        assert (s.statistics.n_samples, s.statistics.dtype, s.values.batch_size, s.templates.max_per_group) == (
            1000, "float64", 16, None)
    with caplog.at_level(logging.WARNING):
        for cls in (LocFTBF, DepthFirstFT):
            ft = cls(model=model, tokenizer=tokenizer)
            assert ft.default_location() == {"target_modules": ["mlp.gate_proj"], "layers_to_transform": [4]}
            assert ft.learning_rate == 2e-3
            assert set(ft.masked_parameters()) == {"model.layers.4.mlp.gate_proj.weight"}
            # writes at the subject's tokens take the file's at_subject location (LocFT-BF's file has one)
            for where in ("subject", "subject_answer") if cls is LocFTBF else ():
                ft = cls(model=model, tokenizer=tokenizer, write_positions=where)
                assert ft.default_location() == {"target_modules": ["mlp.gate_proj"], "layers_to_transform": [3, 4, 5]}
                assert ft.learning_rate == 2e-3
                assert set(ft.masked_parameters()) == {f"model.layers.{i}.mlp.gate_proj.weight" for i in (3, 4, 5)}
    assert "location_sweep" not in caplog.text


def test_a_30_block_llama_of_other_sizes_gets_the_editor_defaults(tokenizer, caplog):
    from lit_edit.editors import EMMET, MEMIT, ROME, LocFTBF

    model = _meta_llama("smollm2-135m", hidden_size=512, num_attention_heads=8, num_key_value_heads=4)
    with caplog.at_level(logging.WARNING):
        rome = ROME(model=model, tokenizer=tokenizer)
        assert rome.edit_layers == [5]  # the depth fallback, with a warning
        v = rome.settings.values
        assert (v.lr, v.steps, v.weight_decay, v.clamp_norm_factor) == (0.5, 20, 0.5, 4.0)
        for cls in (MEMIT, EMMET):
            s = cls(model=model, tokenizer=tokenizer).settings
            assert s.layers == [3, 4, 5, 6]
            assert (s.values.steps, s.values.weight_decay, s.values.clamp_norm_factor) == (25, 0.5, 0.75)
            assert s.statistics.update_weight == 15000.0
        ft = LocFTBF(model=model, tokenizer=tokenizer)
        assert ft.default_location() == {"target_modules": ["mlp.down_proj"], "layers_to_transform": [20]}
        assert ft.learning_rate == 5e-4
    assert "recipes/location_sweep.py" in caplog.text
    assert "no default layers" in caplog.text


def test_emmet_reads_its_own_file(tokenizer, tmp_path, monkeypatch):
    from lit_edit.editors import EMMET, MEMIT

    copy = tmp_path / "hub"
    shutil.copytree(hub.HUB_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    emmet_file = copy / "smollm2-135m" / "emmet.yaml"
    emmet_file.write_text("layers: [6, 7]\nvalues:\n  steps: 7\nstatistics:\n  update_weight: 123.0\n")
    monkeypatch.setattr(hub, "HUB_DIR", copy)
    hub._models.cache_clear()
    try:
        model = _meta_llama()
        em, me = EMMET(model=model, tokenizer=tokenizer).settings, MEMIT(model=model, tokenizer=tokenizer).settings
        assert (em.layers, em.values.steps, em.statistics.update_weight) == ([6, 7], 7, 123.0)
        assert em.values.weight_decay == 0.5  # not in its file: EMMET's generic default, not MEMIT's model value
        assert (me.layers, me.values.steps, me.statistics.update_weight) == ([3, 4, 5], 25, 500.0)
        emmet_file.unlink()  # no file for EMMET: its generic defaults, never MEMIT's file
        em = EMMET(model=model, tokenizer=tokenizer).settings
        assert em.statistics.update_weight == 15000.0 and em.values.clamp_norm_factor == 0.75
    finally:
        hub._models.cache_clear()


def test_explicit_arguments_beat_the_hub(tokenizer):
    from lit_edit.editors import MEMIT, ROME, LocFTBF
    from lit_edit.editors.closed_form import StatisticsOptions, ValueOptions

    model = _meta_llama()
    rome = ROME(model=model, tokenizer=tokenizer, layers=6, values=ValueOptions(steps=7, clamp_norm_factor=2.0))
    s = rome.settings
    assert s.layers == [6] and (s.values.steps, s.values.clamp_norm_factor) == (7, 2.0)
    assert s.values.weight_decay == 1e-3  # not given: still the hub's
    me = MEMIT(model=model, tokenizer=tokenizer, values={"weight_decay": 0.25},
               statistics=StatisticsOptions(update_weight=42.0, n_samples=10))
    assert me.update_weight() == 42.0 and me.settings.values.weight_decay == 0.25
    assert me.settings.statistics.n_samples == 10 and me.settings.values.steps == 25
    assert LocFTBF(model=model, tokenizer=tokenizer, lr=1e-2).learning_rate == 1e-2
    own = LocFTBF(model=model, tokenizer=tokenizer, target_modules=["mlp.down_proj"], layers_to_transform=[2])
    assert own.learning_rate == 5e-4  # the hub's 2e-3 belongs to its own location


# --------------------------------------------------------------------------- typed settings


def test_options_validate_with_the_option_name(tokenizer):
    from lit_edit.editors import ROME
    from lit_edit.editors.closed_form import StatisticsOptions, TemplateOptions, ValueOptions

    with pytest.raises(ValueError, match=r"values\.steps must be >= 1"):
        ValueOptions(steps=0)
    with pytest.raises(ValueError, match=r"values\.lr must be > 0"):
        ValueOptions(lr=0.0)
    with pytest.raises(ValueError, match=r"statistics\.n_samples must be >= 1"):
        StatisticsOptions(n_samples=0)
    with pytest.raises(ValueError, match=r"statistics\.dtype must be 'float32' or 'float64'"):
        StatisticsOptions(dtype="float16")
    with pytest.raises(ValueError, match=r"templates\.max_per_group must be >= 0"):
        TemplateOptions(max_per_group=-1)
    with pytest.raises(ValueError, match=r"unknown values option\(s\) \['stepz'\]"):
        ROME(model=_meta_llama(), tokenizer=tokenizer, values={"stepz": 3})


def test_command_line_nests_the_settings_groups():
    from jsonargparse import ArgumentParser

    from lit_edit.editors import EMMET, ROME

    for cls in (ROME, EMMET):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "model")
        cfg = parser.parse_args(["--model.values.steps", "10", "--model.statistics.n_samples", "5",
                                 "--model.templates.max_per_group", "0", "--model.layers", "[4]"])
        assert cfg["model.values.steps"] == 10 and cfg["model.values.lr"] is None
        assert cfg["model.statistics.n_samples"] == 5 and cfg["model.templates.max_per_group"] == 0
        dumped = yaml.safe_load(parser.dump(cfg))["model"]
        assert dumped["values"]["steps"] == 10 and dumped["statistics"]["n_samples"] == 5
    assert "original_rome" in inspect.signature(ROME.__init__).parameters
    assert "emmet_lambda" in inspect.signature(EMMET.__init__).parameters


def test_hparams_are_plain_and_init_args_round_trip(tokenizer):
    from lit_edit.editors import EMMET, ROME
    from lit_edit.editors.closed_form import ValueOptions

    model = _meta_llama()
    for cls, extra in ((ROME, {"original_rome": True}), (EMMET, {"emmet_lambda": 0.5})):
        ed = cls(model=model, tokenizer=tokenizer, values=ValueOptions(steps=9), **extra)
        args = ed.init_args()
        assert set(args) == set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        assert args["values"]["steps"] == 9 and args["values"]["lr"] is None  # as given: None = hub
        assert all(args[k] == v for k, v in extra.items())
        assert json.loads(json.dumps(args)) == args
        assert yaml.safe_load(yaml.safe_dump(dict(ed.hparams_initial))) == args
        again = cls(model=model, tokenizer=tokenizer, **{k: v for k, v in args.items() if k != "model"})
        assert again.settings == ed.settings and again.init_args() == args


def test_closed_form_checkpoint_loads(tokenizer, tmp_path, cache):
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_edit.data.request import EditRequest
    from lit_edit.editors import MEMIT

    def tiny():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()

    requests = [EditRequest(prompt="Paris is the capital of", subject="Paris", target_new="Italy", case_id=0)]
    ed = MEMIT(model=tiny(), tokenizer=tokenizer, layers=[1], values={"steps": 2},
               statistics={"adjustment": False}, templates={"max_per_group": 0})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", enable_checkpointing=False)
    trainer.fit(ed, train_dataloaders=torch.utils.data.DataLoader(requests, batch_size=1, collate_fn=list))
    ckpt = tmp_path / "memit.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)  # plain hyperparameters: loadable without unpickling classes
    assert state["hyper_parameters"]["values"]["steps"] == 2
    loaded = MEMIT.load_from_checkpoint(ckpt, model=tiny(), tokenizer=tokenizer)
    assert loaded.settings == ed.settings
    name = ed.weight_name(1)
    edited = dict(ed.model.named_parameters())[name]
    from lit_edit.edits import read_edit

    meta, _ = read_edit(ed.save_edit(tmp_path / "edit"))
    assert meta["init_args"]["values"]["lr"] is None  # as given
    assert meta["resolved_settings"]["values"]["lr"] == 0.5 and meta["resolved_settings"]["layers"] == [1]
    assert meta["resolved_settings"]["statistics"]["update_weight"] == 15000.0  # generic: not in the hub
    assert not torch.equal(dict(tiny().named_parameters())[name], edited)
    assert torch.equal(dict(loaded.model.named_parameters())[name], edited)


def test_subject_writes_on_a_location_measured_for_all_positions_warn(tokenizer, caplog):
    """Llama-3-8B's fine-tuning file has no ``at_subject`` group: writes at the subject keep its
    location and say that it was measured for writes everywhere."""
    from transformers import LlamaForCausalLM

    from lit_edit.editors import LocFTBF

    spec = yaml.safe_load((hub.HUB_DIR / "llama-3-8b" / "model.yaml").read_text())
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(spec["signature"], "meta-llama/Meta-Llama-3-8B")).eval()
    location = {"target_modules": ["mlp.down_proj"], "layers_to_transform": [22]}
    with caplog.at_level(logging.WARNING):
        assert LocFTBF(model=model, tokenizer=tokenizer).default_location() == location
        assert "location_sweep" not in caplog.text  # written everywhere: the file's own location, no warning
        subject = LocFTBF(model=model, tokenizer=tokenizer, write_positions="subject")
        assert subject.default_location() == subject.default_location() == location
    assert "measured for edits written at every position" in caplog.text and "write_positions='subject'" in caplog.text
    assert caplog.text.count("measured for edits written at every position") == 1  # said once per editor
