"""Checks of user-facing options: a bad value is refused when the object is built, naming the option.

Every check raises ``TypeError`` for a value of the wrong kind (``lr="abc"``) and ``ValueError``
for a value out of range (``lr=-1``, ``lr=nan``), each message starting with the option's name
as the command line spells it (``values.steps must be >= 1, got 0``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = ["check_bool", "check_int", "check_real", "check_str"]


def _show(value: Any) -> str:
    """``repr(value)``, shortened to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bound(name: str, number: Any, minimum: Any, maximum: Any, exclusive: bool, value: Any) -> None:
    if minimum is not None and (number <= minimum if exclusive else number < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {_show(value)}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {_show(value)}")


def check_real(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    exclusive: bool = False,
    maximum: Optional[float] = None,
    allow_none: bool = False,
) -> Optional[float]:
    """``value`` as a finite ``float`` within the bounds (``exclusive``: strictly above ``minimum``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {_show(value)}")
    _bound(name, number, minimum, maximum, exclusive, value)
    return number


def check_int(
    name: str,
    value: Any,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    allow_none: bool = False,
) -> Optional[int]:
    """``value`` as an ``int`` within the bounds (a ``bool`` or a float is refused)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {_show(value)}")
    number = int(value)
    _bound(name, number, minimum, maximum, False, value)
    return number


def check_bool(name: str, value: Any, allow_none: bool = False) -> Optional[bool]:
    """``value`` if it is a ``bool`` (``"no"`` or ``0`` are refused, not read as truth values);
    ``None`` too with ``allow_none`` (an automatic choice)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "true, false or null" if allow_none else "true or false"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {_show(value)}")
    return value


def check_str(name: str, value: Any, allow_none: bool = False) -> Optional[str]:
    """``value`` if it is a string with visible text."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {_show(value)}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {_show(value)}")
    return value
