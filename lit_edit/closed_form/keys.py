"""Keys (inputs of a layer's MLP output projection) and site outputs at the fact token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_edit.closed_form.hooks import forward_until
from lit_edit.closed_form.tokens import encode_in_template
from lit_edit.data.request import EditRequest
from lit_edit.data.tokenize import pad_rows
from lit_edit.models import ArchSpec, arch_for

__all__ = ["mlp_out_module", "keys_at", "block_outputs_at", "template_average", "projection_weight"]


def mlp_out_module(model: nn.Module, layer: int, arch: ArchSpec | None = None) -> nn.Module:
    arch = arch or arch_for(model)
    return model.get_submodule(arch.mlp_out_name(layer))


def projection_weight(model: nn.Module, layer: int, arch: ArchSpec | None = None) -> torch.Tensor:
    """The edit matrix W of a layer as ``(d_out, d_in)`` (a transposed view for GPT-2 Conv1D)."""
    arch = arch or arch_for(model)
    w = mlp_out_module(model, layer, arch).weight
    return w.t() if arch.conv1d else w


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _rows_at(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[tuple[list[int], int]],
    module: nn.Module,
    kind: str,
    batch_size: int,
) -> torch.Tensor:
    """Module input (``kind="input"``) or output at one position per row, stopping the forward there."""
    device = _device(model)
    out: list[torch.Tensor] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ids, mask = pad_rows([r[0] for r in chunk], tokenizer.pad_token_id)
        pos = torch.tensor([r[1] for r in chunk], device=device)
        h = forward_until(model, module, kind, ids.to(device), mask.to(device))
        out.append(h[torch.arange(len(chunk), device=device), pos].float())
    return torch.cat(out)


def template_average(values: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
    """Mean within each template group, then mean of the group means.

    ``values`` is ``(R * sum(group_sizes), d)`` laid out request-major; returns ``(R, d)``.
    """
    per = sum(group_sizes)
    v = values.view(-1, per, values.shape[-1])
    means, start = [], 0
    for g in group_sizes:
        means.append(v[:, start : start + g].mean(1))
        start += g
    return torch.stack(means, 0).mean(0)


def keys_at(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[Sequence[str]] = (("{}",),),
    batch_size: int = 64,
    arch: ArchSpec | None = None,
) -> torch.Tensor:
    """Template-averaged keys ``(R, d_in)`` at ``layer``'s MLP output projection (float32).

    ``templates`` are groups of ``"… {}"`` strings; each request's key is the mean within each
    group of the fact-token inputs, then the mean of the group means.
    """
    arch = arch or arch_for(model)
    flat = [t for g in templates for t in g]
    rows = []
    for r in requests:
        for t in flat:
            e = encode_in_template(tokenizer, r, t)
            rows.append((e.ids, e.fact_index))
    keys = _rows_at(model, tokenizer, rows, mlp_out_module(model, layer, arch), "input", batch_size)
    return template_average(keys, [len(g) for g in templates])


def block_outputs_at(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    batch_size: int = 64,
    arch: ArchSpec | None = None,
    site: str = "block",
) -> torch.Tensor:
    """Output ``(R, d_model)`` of block ``layer`` (``site="block"``) or of its MLP output
    projection (``site="mlp_out"``) at the fact token of each bare prompt."""
    arch = arch or arch_for(model)
    module = model.get_submodule(arch.layer_name(layer)) if site == "block" else mlp_out_module(model, layer, arch)
    rows = []
    for r in requests:
        e = encode_in_template(tokenizer, r, "{}")
        rows.append((e.ids, e.fact_index))
    return _rows_at(model, tokenizer, rows, module, "output", batch_size)
