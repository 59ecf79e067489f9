"""The schema of a configuration: which sections and fields it may hold, and their checks.

:class:`ConfigError` is the error every invalid configuration raises. A :data:`Check` turns one
field's value into its normalized value or raises ``ValueError`` with the reason; the factories
here (:func:`_int`, :func:`_number`, :func:`_text`, ...) build them, and the tables
:data:`TRAIN_FIELDS`, :data:`TOY_FIELDS` and :data:`TOP_FIELDS` map each fixed field to its
check (:data:`TOP_KEYS`: every top-level key). The sections whose keys come from a signature
(``data``, ``model``, ``optimizer``, ...) are checked in :mod:`experiments._config_validate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["TOP_FIELDS", "TOP_KEYS", "TOY_FIELDS", "TRAIN_FIELDS", "Check", "ConfigError"]


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


Check = Callable[[str, Any], Any]
"""``check(dotted_key, value) -> normalized value``; raises ``ValueError`` with the reason."""

_SECTIONS = ("data", "model", "optimizer", "train", "balancers", "toy")
_OPTIONAL_SECTIONS = ("regularizer",)  # an object or null
_LEVELS = ("representation", "parameters")


def _int(minimum: int, *, optional: bool = False) -> Check:
    def check(key: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer{' or null' if optional else ''}, got {v!r}")
        if v < minimum:
            raise ValueError(f"must be >= {minimum}, got {v}")
        return v

    return check


def _number(*, positive: bool = False, minimum: float | None = None) -> Check:
    def check(key: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        if positive and v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        if minimum is not None and v < minimum:
            raise ValueError(f"must be >= {minimum}, got {v}")
        return v

    return check


def _bool(key: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _instance(
    cls: type, what: str, *, optional: bool = False, choices: Sequence[str] = ()
) -> Check:
    """A value of type ``cls`` (``what`` in the message; ``None`` too when ``optional``), one
    of ``choices`` when given."""

    def check(key: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if not isinstance(v, cls):
            raise ValueError(f"must be {what}{' or null' if optional else ''}, got {v!r}")
        if choices and v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    return check


def _text(*, optional: bool = False, choices: Sequence[str] = ()) -> Check:
    return _instance(str, "a string", optional=optional, choices=choices)


def _list(*, optional: bool = False) -> Check:
    return _instance(list, "a JSON list", optional=optional)


def _metric_lists(key: str, v: Any) -> Any:
    if not isinstance(v, dict):
        raise ValueError(f'must be an object like {{"binary": ["auc"]}}, got {v!r}')
    for kind, names in v.items():
        if kind not in ("binary", "regression", "toy"):
            raise ValueError(f"has the task kind {kind!r}; use binary, regression or toy")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{kind} must be a list of metric names, got {names!r}")
    return v


#: ``train.*``: what :func:`experiments.runner.train_one` reads.
TRAIN_FIELDS: dict[str, Check] = {
    "epochs": _int(1),
    "batch_size": _int(1),
    "early_stopping_patience": _int(0, optional=True),
    "level": _text(choices=_LEVELS),
    "eval_every": _int(1),
    "selection_metric": _text(optional=True),
    "max_steps": _int(1, optional=True),
    "device": _text(optional=True),
    "eval_batch_size": _int(1),
}

#: ``toy.*``: :data:`experiments.toy.TOY_DEFAULTS`.
TOY_FIELDS: dict[str, Check] = {
    "steps": _int(1),
    "lr": _number(positive=True),
    "scales": _list(optional=True),
    "starts": _list(optional=True),
    "level": _text(choices=_LEVELS),
    "record_every": _int(1),
    "reach_tol": _number(minimum=0.0),
}

#: top-level scalar fields (sections are checked by their own rules).
TOP_FIELDS: dict[str, Check] = {
    "task": _text(),
    "description": _text(),
    "note": _text(),
    "source": _text(),
    "single_task": _bool,
    "seeds": _int(1),
    "threads": _int(1, optional=True),
    "delta_m_metrics": _metric_lists,
    "table_metrics": _metric_lists,
}

TOP_KEYS: tuple[str, ...] = tuple(
    sorted({*TOP_FIELDS, *_SECTIONS, *_OPTIONAL_SECTIONS, "scheduler"})
)
"""Every top-level key a configuration may have."""
