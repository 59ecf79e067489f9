"""Validation of the balancers' constructor and function options: one implementation, one rule.

The rule (every helper here follows it):

* a value of the wrong **type** raises :class:`TypeError` (a number where a choice string is
  expected, a string or a ``bool`` where a number is expected, an ``int`` where a ``bool`` is
  expected);
* a value of the right type that is not allowed raises :class:`ValueError` (an unknown choice, a
  negative or non-finite number).

Both name the option and show the value received. ``bool`` is never accepted as a number
(``True`` is an ``int`` to Python, but ``alpha=True`` is a mistake).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_positive", "check_real"]


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``.

    Raises:
        TypeError: ``value`` is not a ``str``.
        ValueError: ``value`` is a string that is not among ``choices``.
    """
    options = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be one of {options}, got {value!r} of type {type(value).__name__}"
        )
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite ``float``.

    Raises:
        TypeError: ``value`` is not an ``int`` or ``float`` (or is a ``bool``).
        ValueError: ``value`` is NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a finite positive ``float`` (non-negative with ``allow_zero=True``).

    Raises:
        TypeError: ``value`` is not an ``int`` or ``float`` (or is a ``bool``).
        ValueError: ``value`` is NaN, infinite, negative, or zero without ``allow_zero``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} "
            f"number, got {value!r}"
        )
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; :class:`TypeError` otherwise (``1`` is not a bool here)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value
