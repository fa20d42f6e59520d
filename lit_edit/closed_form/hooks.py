"""Forward hooks used by the locate-and-edit machinery (no state outside the context managers)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["StopForward", "stop_after", "stop_before", "first_tensor", "replace_first"]


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
