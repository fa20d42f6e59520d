"""Saving, loading and applying edits: the touched tensors plus a JSON description.

An edit directory holds ``edit.safetensors`` (the edited values of every touched tensor, named
relative to the Hugging Face model) and ``edit.json``::

    {"format": "lit_edit/1", "base_model": "smollm2-135m", "editor": "lit_edit.editors.LocFTBF",
     "init_args": {...}, "tensors": {"model.layers.22.mlp.down_proj.weight":
         {"shape": [...], "dtype": "float32", "original_sha256": "...", "edited_sha256": "..."}}}

Applying an edit checks every target tensor of the base model against ``original_sha256``
(and shape and dtype) first, so an edit is never written onto a different base. Directories
are written atomically (temporary sibling, then rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.io import atomic_directory
from lit_edit.models import load_causal_lm

FORMAT = "lit_edit/1"
TENSORS_FILE = "edit.safetensors"
META_FILE = "edit.json"

__all__ = ["tensor_sha256", "write_edit", "read_edit", "apply_edit", "load_edit", "export_model", "EditMismatchError"]


class EditMismatchError(ValueError):
    """The base model does not match the one an edit was made on."""


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (exact: any bit change alters it)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_edit(
    directory: Union[str, Path],
    edited: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    base_model: str,
    editor: str,
    init_args: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    from safetensors.torch import save_file

    if not edited:
        raise ValueError("nothing to save: the editor has not touched any tensor yet (run an edit first)")
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in edited.items()}
    meta = {
        "format": FORMAT,
        "base_model": base_model,
        "editor": editor,
        "init_args": init_args,
        "tensors": {
            k: {
                "shape": list(v.shape),
                "dtype": str(v.dtype).replace("torch.", ""),
                "original_sha256": tensor_sha256(originals[k]),
                "edited_sha256": tensor_sha256(v),
            }
            for k, v in tensors.items()
        },
        **(extra or {}),
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def read_edit(directory: Union[str, Path]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not a lit_edit edit (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} (expected {FORMAT!r})")
    tensors = load_file(str(directory / TENSORS_FILE))
    for name, info in meta["tensors"].items():
        if name not in tensors:
            raise ValueError(f"{directory}: tensor {name!r} is described but missing from {TENSORS_FILE}")
        if tensor_sha256(tensors[name]) != info["edited_sha256"]:
            raise ValueError(f"{directory}: tensor {name!r} does not match its recorded hash (corrupt edit)")
    return meta, tensors


@torch.no_grad()
def apply_edit(model: nn.Module, directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Write an edit into ``model`` in place; returns the replaced original tensors (CPU copies).

    Every tensor is checked before any is written: a mismatched base changes nothing.
    """
    meta, tensors = read_edit(directory)
    params = dict(model.named_parameters())
    targets = {}
    for name, info in meta["tensors"].items():
        if name not in params:
            raise EditMismatchError(
                f"base model {type(model).__name__} has no tensor {name!r} (edit made on {meta['base_model']!r})"
            )
        p = params[name]
        if list(p.shape) != info["shape"] or str(p.dtype).replace("torch.", "") != info["dtype"]:
            raise EditMismatchError(
                f"tensor {name!r} is {p.dtype} {tuple(p.shape)} in this model but {info['dtype']} "
                f"{tuple(info['shape'])} in the edit (made on {meta['base_model']!r}); load the base with that dtype"
            )
        if tensor_sha256(p) != info["original_sha256"]:
            raise EditMismatchError(
                f"tensor {name!r} differs from the one the edit was made on ({meta['base_model']!r}): "
                "refusing to apply the edit to a different base model (or one already edited)"
            )
        targets[name] = p
    originals = {name: p.detach().cpu().clone() for name, p in targets.items()}
    for name, p in targets.items():
        p.copy_(tensors[name].to(p.device))
    return originals


def load_edit(
    directory: Union[str, Path], model: Optional[Union[str, nn.Module]] = None, tokenizer: Any = None, **load_kwargs: Any
) -> tuple[nn.Module, Any]:
    """Load the edit's base model (or ``model``) and apply the edit; returns ``(model, tokenizer)``."""
    meta, _ = read_edit(directory)
    if model is None:
        model = meta["base_model"]
        load_kwargs.setdefault("dtype", next(iter(meta["tensors"].values()))["dtype"])
    hf_model, tok = load_causal_lm(model, tokenizer, **load_kwargs)
    apply_edit(hf_model, directory)
    return hf_model, tok


def export_model(model: nn.Module, tokenizer: Any, directory: Union[str, Path]) -> Path:
    """Write a plain ``save_pretrained`` checkpoint (edit merged) atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory
