"""Config hub: per-model editor settings shipped as YAML files with the package.

Layout (one directory per model, one file per editor)::

    lit_edit/config_hub/
        defaults/<editor>.yaml        generic settings of each editor (any model)
        <model>/model.yaml            how a loaded model is recognised (names + architecture)
        <model>/<editor>.yaml         that model's settings for that editor

``<editor>`` is the editor's hub key (:data:`EDITOR_CLASSES`: ``rome``, ``memit``, ``emmet``,
``alphaedit``, ``locft_bf``, ``depth_first_ft``). Every key of an editor file is an argument of that editor's
``__init__``; the settings groups of the closed-form editors are nested mappings
(``values: {steps: 25}``), exactly as in a recipe's ``model:`` section.

A model file only fills the arguments a user leaves at ``None``: an explicit argument always
wins, then the model's file, then ``defaults/<editor>.yaml``.

Recognising a model (:func:`identify`) compares its config with every ``model.yaml``:

* ``names``: values of ``config.name_or_path`` (hub ids, the embedded name, ...), compared
  case-insensitively, in full or by their last path component;
* ``signature``: ``model_type``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads`` and ``vocab_size``.

The signature must always agree, so a model that merely shares the architecture family and
depth of a hub model (same ``model_type`` and number of blocks, other sizes) is not taken for
it. A matching name picks the entry; without one, a model whose signature matches exactly one
entry (a local copy saved under another path) is recognised by its architecture.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any, Optional

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS",
    "EDITOR_CLASSES",
    "HUB_DIR",
    "SIGNATURE_FIELDS",
    "editor_class",
    "hub_defaults",
    "hub_settings",
    "identify",
    "list_hub",
    "model_signature",
    "read_hub_file",
]

#: Directory holding the hub's YAML files.
HUB_DIR = Path(__file__).resolve().parent
#: Name of the directory of generic (model-independent) settings.
DEFAULTS = "defaults"
#: Name of the file that says how a model is recognised.
MODEL_FILE = "model.yaml"
#: Config fields compared to recognise a model.
SIGNATURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
#: Hub key -> editor class (import path).
EDITOR_CLASSES: dict[str, str] = {
    "rome": "lit_edit.editors.rome.ROME",
    "memit": "lit_edit.editors.memit.MEMIT",
    "emmet": "lit_edit.editors.emmet.EMMET",
    "alphaedit": "lit_edit.editors.alphaedit.AlphaEdit",
    "locft_bf": "lit_edit.editors.finetune.LocFTBF",
    "depth_first_ft": "lit_edit.editors.finetune.DepthFirstFT",
}

_logged: set[tuple[str, ...]] = set()


def editor_class(key: str) -> type:
    """The editor class of a hub key (``rome`` -> :class:`~lit_edit.editors.ROME`, ...)."""
    import importlib

    if key not in EDITOR_CLASSES:
        raise KeyError(f"unknown editor key {key!r}; the config hub knows {sorted(EDITOR_CLASSES)}")
    module, _, name = EDITOR_CLASSES[key].rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _read(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config hub file must hold a mapping, got {type(data).__name__}")
    return data


def read_hub_file(model: str, editor_key: str) -> dict[str, Any]:
    """Contents of ``<model>/<editor_key>.yaml`` (``{}`` when the hub has no such file)."""
    path = HUB_DIR / model / f"{editor_key}.yaml"
    return copy.deepcopy(_read(path)) if path.is_file() else {}


def list_hub() -> dict[str, list[str]]:
    """Every model directory of the hub with the editor keys it has a file for (sorted)."""
    out: dict[str, list[str]] = {}
    for d in sorted(p for p in HUB_DIR.iterdir() if p.is_dir() and (p / MODEL_FILE).is_file()):
        out[d.name] = sorted(f.stem for f in d.glob("*.yaml") if f.name != MODEL_FILE)
    return out


@functools.cache
def _models() -> dict[str, dict[str, Any]]:
    """Model directory -> its ``model.yaml`` (validated)."""
    models = {}
    for name in list_hub():
        spec = _read(HUB_DIR / name / MODEL_FILE)
        names, sig = spec.get("names"), spec.get("signature")
        if not isinstance(names, list) or not isinstance(sig, dict):
            raise ValueError(f"{HUB_DIR / name / MODEL_FILE}: needs a 'names' list and a 'signature' mapping")
        missing = [k for k in SIGNATURE_FIELDS if k not in sig]
        if missing:
            raise ValueError(f"{HUB_DIR / name / MODEL_FILE}: signature lacks {missing}")
        models[name] = spec
    return models


def _config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return config if config is not None else model


def model_signature(model: Any) -> dict[str, Any]:
    """The :data:`SIGNATURE_FIELDS` of a model (or config), under their Llama-style names.

    GPT-2/GPT-J style configs are read through their attribute map (``n_embd`` is
    ``hidden_size``); their ``n_inner`` gives ``intermediate_size`` (``None`` = 4 × hidden), and
    a config without ``num_key_value_heads`` has as many key/value heads as attention heads.
    """
    config = _config(model)
    sig = {k: getattr(config, k, None) for k in SIGNATURE_FIELDS}
    if sig["intermediate_size"] is None and hasattr(config, "n_inner"):
        inner = getattr(config, "n_inner", None)
        sig["intermediate_size"] = inner if inner is not None else (4 * sig["hidden_size"] if sig["hidden_size"] else None)
    if sig["num_key_value_heads"] is None:
        sig["num_key_value_heads"] = sig["num_attention_heads"]
    return sig


def _name_matches(name_or_path: str, names: list[str]) -> bool:
    given = name_or_path.strip().rstrip("/").lower()
    if not given:
        return False
    given_last = given.replace("\\", "/").rsplit("/", 1)[-1]
    for n in names:
        n = str(n).strip().rstrip("/").lower()
        if given == n or given_last == n.rsplit("/", 1)[-1]:
            return True
    return False


def _log_once(level: int, key: tuple[str, ...], msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def identify(model: Any) -> Optional[str]:
    """The hub directory name of a loaded Hugging Face model (or its config), or ``None``."""
    config = _config(model)
    name_or_path = str(getattr(config, "name_or_path", "") or "")
    sig = model_signature(config)
    models = _models()
    by_sig = [m for m, spec in models.items() if {k: spec["signature"][k] for k in SIGNATURE_FIELDS} == sig]
    by_name = [m for m, spec in models.items() if _name_matches(name_or_path, spec["names"])]
    if by_name:
        hit = [m for m in by_name if m in by_sig]
        if hit:
            return hit[0]
        expected = models[by_name[0]]["signature"]
        diff = ", ".join(f"{k} {sig[k]!r} (hub {expected[k]!r})" for k in SIGNATURE_FIELDS if sig[k] != expected[k])
        _log_once(
            logging.WARNING, ("name-mismatch", name_or_path, str(sig)),
            "config hub: %r is named like %s but its architecture differs: %s; not using its settings",
            name_or_path, by_name[0], diff,
        )
        return None
    if len(by_sig) == 1:
        return by_sig[0]
    if len(by_sig) > 1:
        _log_once(
            logging.WARNING, ("ambiguous", name_or_path, str(sig)),
            "config hub: the architecture of %r matches %s; name the model by one of their names to choose",
            name_or_path, by_sig,
        )
    return None


def hub_defaults(editor_key: str) -> dict[str, Any]:
    """The generic settings of an editor (``defaults/<editor_key>.yaml``)."""
    path = HUB_DIR / DEFAULTS / f"{editor_key}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (HUB_DIR / DEFAULTS).glob("*.yaml"))
        raise KeyError(f"the config hub has no editor {editor_key!r} (known: {known})")
    return copy.deepcopy(_read(path))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def hub_settings(model: Any, editor_key: str) -> dict[str, Any]:
    """Settings of ``editor_key`` for ``model``: the generic defaults merged with the model's file.

    Nested groups are merged key by key. Which file applied is logged once per model and editor.
    """
    generic = hub_defaults(editor_key)
    name = identify(model)
    config = _config(model)
    who = str(getattr(config, "name_or_path", "") or type(model).__name__)
    specific = read_hub_file(name, editor_key) if name else {}
    if name and specific:
        _log_once(logging.INFO, ("applied", who, name, editor_key),
                  "config hub: %s/%s.yaml applies to %r", name, editor_key, who)
    elif name:
        _log_once(logging.INFO, ("no-file", who, name, editor_key),
                  "config hub: %r is %s, which has no %s.yaml; using the generic defaults (%s/%s.yaml)",
                  who, name, editor_key, DEFAULTS, editor_key)
    else:
        _log_once(logging.INFO, ("unknown", who, editor_key),
                  "config hub: no entry for %r (%s, %s blocks); using the generic defaults (%s/%s.yaml)",
                  who, getattr(config, "model_type", "?"), model_signature(config)["num_hidden_layers"],
                  DEFAULTS, editor_key)
    return _merge(generic, specific)
