"""Forward hooks that read a module's input or output and stop the forward pass there.

Used by the key statistics, the keys and the v*/z optimisation: a forward that only needs the
input of block ``l``'s MLP output projection never runs the blocks above it. No state lives
outside the context managers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["StopForward", "first_tensor", "forward_until", "replace_first", "run_until_stopped", "stop_after", "stop_before"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by the caller)."""


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_first(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (value,) + tuple(output[1:])
    if isinstance(output, list):
        return [value] + list(output[1:])
    return value


@contextmanager
def stop_before(module: nn.Module, store: Callable[[tuple, dict], None]) -> Iterator[None]:
    """Call ``store(args, kwargs)`` with the module's inputs, then stop the forward."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict):
        store(args, kwargs)
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def stop_after(module: nn.Module, store: Callable[[Any], None]) -> Iterator[None]:
    """Call ``store(output)`` with the module's output, then stop the forward."""

    def hook(mod: nn.Module, args: tuple, output: Any):
        store(output)
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until_stopped(fn: Callable[[], Any]) -> Optional[Any]:
    try:
        return fn()
    except StopForward:
        return None


def forward_until(
    model: nn.Module,
    module: nn.Module,
    where: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Run ``model`` on a batch up to ``module`` and return that module's input (``where="input"``:
    its first positional argument, or its first keyword argument) or output (``"output"``: the
    hidden-state tensor); the layers after it never run."""
    got: dict[str, torch.Tensor] = {}
    if where == "input":
        ctx = stop_before(module, lambda args, kwargs: got.__setitem__("h", args[0] if args else next(iter(kwargs.values()))))
    elif where == "output":
        ctx = stop_after(module, lambda output: got.__setitem__("h", first_tensor(output)))
    else:
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    with ctx:
        run_until_stopped(lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    if "h" not in got:
        raise RuntimeError(f"the forward pass of {type(model).__name__} never reached {type(module).__name__}")
    return got["h"]
