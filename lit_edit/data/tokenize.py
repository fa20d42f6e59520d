"""Tokenization of (prompt, target) pairs, shared by the training losses and the evaluators.

Prompt and target are tokenized separately (the target after a leading space, without special
tokens) and concatenated, so the boundary is exact whatever the tokenizer merges. Batches are
right-padded with the pad token (EOS for lit_edit); ``labels`` hold the target ids and ``-100``
on prompt and padding positions.

Prompts and targets follow the tokenizer's :class:`~lit_edit.data.chat.PromptFormat`
(``chat_template``, :mod:`lit_edit.data.chat`): raw text by default; under a chat template the
prompt is the user turn followed by the generation prompt, and the target is the assistant's
answer, tokenized without the leading space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from lit_edit.data.chat import PromptFormat, prompt_format

__all__ = ["IGNORE_INDEX", "encode_left_padded", "encode_pairs", "encode_prompt", "encode_target", "pad_rows", "shift_for_loss", "target_nll"]

IGNORE_INDEX = -100


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists padded to one width: ``(ids, attention_mask)``, both ``long``.

    ``side="right"`` (teacher forcing, statistics) puts the padding after each row,
    ``side="left"`` (batched generation) before it.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def encode_prompt(tokenizer: Any, prompt: str, fmt: Optional[PromptFormat] = None) -> list[int]:
    """Prompt ids: raw text with the tokenizer's own special tokens (BOS for Llama-3, none for
    SmolLM2), or, under a chat template, the chat-wrapped prompt as the template writes it.

    ``fmt`` defaults to the tokenizer's format (:func:`lit_edit.data.chat.prompt_format`).
    """
    fmt = prompt_format(tokenizer, fmt)
    return tokenizer(fmt.wrap(prompt), add_special_tokens=fmt.add_special_tokens)["input_ids"]


def encode_target(tokenizer: Any, target: str, append_eos: bool = False, fmt: Optional[PromptFormat] = None) -> list[int]:
    """Target ids (after a leading space in raw text, as is under a chat template), optionally followed by EOS."""
    ids = tokenizer(prompt_format(tokenizer, fmt).answer_text(target), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids + [tokenizer.eos_token_id] if append_eos else ids


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    append_eos: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` and ``prompt_lengths``.

    ``labels[b, t]`` is the token at ``t`` when it belongs to the target, else ``-100``; the
    logits that predict it are at ``t - 1`` (use :func:`shift_for_loss`).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    rows, labels, plens = [], [], []
    for p, t in zip(prompts, targets):
        p_ids = encode_prompt(tokenizer, p)
        t_ids = encode_target(tokenizer, t, append_eos)
        rows.append(p_ids + t_ids)
        labels.append([IGNORE_INDEX] * len(p_ids) + t_ids)
        plens.append(len(p_ids))
    input_ids, mask = pad_rows(rows, tokenizer.pad_token_id)
    label_t, _ = pad_rows(labels, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": label_t,
        "prompt_lengths": torch.tensor(plens, dtype=torch.long),
    }


def encode_left_padded(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation."""
    input_ids, mask = pad_rows([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, side="left")
    return {"input_ids": input_ids, "attention_mask": mask}


def shift_for_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at ``t-1`` with labels at ``t``."""
    return logits[:, :-1], labels[:, 1:]


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each row's target tokens, shape ``(B,)`` (FT-M / CounterFact scoring).

    The softmax is taken only at target positions (not over every position of the batch).
    """
    lg, lb = shift_for_loss(logits, labels)
    mask = lb != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    nll = torch.nn.functional.cross_entropy(lg[mask].float(), lb[mask], reduction="none")
    total = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return total / mask.sum(1).clamp_min(1)
