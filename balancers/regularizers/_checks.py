"""Option validation shared by the perturbation regularizers.

The checks turn a bad constructor or setter argument of :class:`PerturbationRegularizer`,
:class:`SCR` or :class:`LSPR` (and the ``noise`` law of :func:`draw_noise`) into a
``ValueError`` naming the option; they return the validated value.
"""

from __future__ import annotations

import math
import numbers


def _check_real(name: str, value: object, *, low: float, high: float | None = None) -> float:
    """``value`` as a float in ``[low, high]`` (finite); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and v > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return v


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
