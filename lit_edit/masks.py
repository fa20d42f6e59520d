"""Localized parameter masks in peft's vocabulary.

A :class:`ParameterMask` names *which tensors* an editor may change, with the fields users know
from peft (``target_modules``: list = suffix match, string = full regex; ``layers_to_transform``;
``layers_pattern``; ``exclude_modules``), matched by peft's own
``check_target_module_exists``. ``element_masks`` optionally restricts a tensor further to a
boolean mask of its elements (rows, columns, or any pattern).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.models import ArchSpec

__all__ = ["LOCATION_KINDS", "ElementMaskHook", "ParameterMask", "check_layers", "location_mask", "resolve_mask"]


@dataclass
class ParameterMask:
    target_modules: Union[list[str], str, None] = None
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    include_bias: bool = False
    element_masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            target_modules=self.target_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            exclude_modules=self.exclude_modules,
        )


def check_layers(
    layers: Any,
    num_layers: Optional[int] = None,
    option: str = "layers_to_transform",
    allow_none: bool = True,
) -> Optional[list[int]]:
    """``layers`` (a block index or a list of them) as a list of ints, or a clear error naming ``option``.

    Refused: an empty list (peft would read it as "every block"), entries that are not integers,
    a block listed twice, and (when ``num_layers`` is given) a block the model does not have.
    """
    if layers is None and allow_none:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
        raise TypeError(f"{option} must be a block index or a list of block indices, got {type(layers).__name__} {layers!r}")
    items = list(layers)
    blocks = f" (0 .. {num_layers - 1})" if num_layers else ""
    if not items:
        raise ValueError(f"{option} is empty: name at least one block{blocks}")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{option} must hold block indices (integers), got {type(x).__name__} {x!r}")
    twice = sorted({int(x) for x in items if items.count(x) > 1})
    if twice:
        raise ValueError(f"{option} lists block(s) {twice} more than once: {items}")
    bad = [int(x) for x in items if x < 0 or (num_layers is not None and x >= num_layers)]
    if bad:
        where = f"a model with {num_layers} blocks{blocks}" if num_layers is not None else "any model (block indices are >= 0)"
        raise ValueError(f"{option} {bad} out of range for {where}")
    return [int(x) for x in items]


def _describe_modules(model: nn.Module) -> str:
    """A compact list of module names: block-relative leaf names and the number of blocks."""

    leaves = set()
    for name, module in model.named_modules():
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            leaves.add(re.sub(r"\.\d+\.", ".{i}.", name))
    return ", ".join(sorted(leaves))


def resolve_mask(model: nn.Module, mask: ParameterMask) -> dict[str, nn.Parameter]:
    """The parameters (by full name) a mask selects. Raises with the available names on a miss."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if mask.target_modules is None or (not isinstance(mask.target_modules, str) and not mask.target_modules):
        raise ValueError("target_modules is empty: name at least one module (e.g. ['mlp.down_proj'])")
    check_layers(mask.layers_to_transform)
    config = mask.peft_config()
    selected: dict[str, nn.Parameter] = {}
    matched_modules: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        hit = check_target_module_exists(config, name)
        if not hit or type(hit).__name__ == "_ExcludedModule":
            continue
        matched_modules.append(name)
        for pname, p in module.named_parameters(recurse=False):
            if pname == "bias" and not mask.include_bias:
                continue
            selected[f"{name}.{pname}"] = p
    if not selected:
        raise KeyError(
            f"no module matches target_modules={mask.target_modules!r}, "
            f"layers_to_transform={mask.layers_to_transform!r}, layers_pattern={mask.layers_pattern!r}. "
            f"Modules with parameters ({{i}} = block index): {_describe_modules(model)}"
        )
    if isinstance(mask.target_modules, list):  # catch typos: every entry must name some module
        all_modules = [n for n, _ in model.named_modules()]
        for t in mask.target_modules:
            if not any(m == t or m.endswith("." + t) for m in all_modules):
                raise KeyError(
                    f"target_modules entry {t!r} matches no module. "
                    f"Modules with parameters ({{i}} = block index): {_describe_modules(model)}"
                )
    for name, m in mask.element_masks.items():
        if name not in selected:
            raise KeyError(f"element mask for {name!r}, which the mask does not select; selected: {sorted(selected)}")
        if m.shape != selected[name].shape or m.dtype != torch.bool:
            raise ValueError(
                f"element mask for {name!r} must be a bool tensor of shape {tuple(selected[name].shape)}, "
                f"got {m.dtype} {tuple(m.shape)}"
            )
    return selected


class ElementMaskHook:
    """Zeroes gradients outside an element mask (the optimizer then sees only masked elements)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask.to(device=grad.device, dtype=grad.dtype)


#: Locations a sweep can visit inside block ``i``.
LOCATION_KINDS = ("attn_out", "mlp_up", "mlp_gate", "mlp_down", "block")


def location_mask(arch: ArchSpec, kind: str, layer: int) -> dict[str, Any]:
    """``target_modules``/``layers_to_transform`` for a named location of block ``layer``."""
    if kind == "block":
        return {"target_modules": rf"{re.escape(arch.layers)}\.{layer}\..+", "layers_to_transform": None}
    kinds = arch.kinds()
    if kind not in kinds:
        raise KeyError(f"location {kind!r} does not exist for this architecture; available: {sorted(kinds) + ['block']}")
    return {"target_modules": [kinds[kind]], "layers_to_transform": [layer]}
