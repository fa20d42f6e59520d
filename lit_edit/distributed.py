"""Collective operations for the processes of a Lightning DDP run (no-ops on one process).

Lightning starts the processes and the process group; lit_edit only reads ``torch.distributed``'s
state, so the same code runs on one CPU, one GPU or N processes. Every function here must be
called by every process of the group, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["all_reduce_sum", "broadcast_tensors", "gather_objects", "rank_and_world_size"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group, ``(0, 1)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` on one process)."""
    _, world = rank_and_world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the processes (in place; returned for chaining)."""
    if rank_and_world_size()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with process ``src``'s value."""
    if rank_and_world_size()[1] == 1:
        return
    for tensor in tensors:
        torch.distributed.broadcast(tensor.data, src=src)
