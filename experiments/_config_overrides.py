"""Command-line overrides of a configuration: ``--set key=value`` items and dict merging.

:func:`parse_value` reads a value (JSON when it parses, else the string), :func:`parse_assignment`
splits a ``key=value`` item, :func:`set_dotted` writes a dotted key into the nested dict
(creating the sections on the way) and :func:`merged` combines two configurations.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from ._config_schema import ConfigError

__all__ = ["merged", "parse_assignment", "parse_value", "set_dotted"]


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (``1``, ``0.5``, ``true``, ``[1, 2]``,
    ``null``), else the string itself (``adam``, ``l2``)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        low = text.strip().lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, parse_value(value))``."""
    if "=" not in item:
        raise ConfigError(f"expected key=value, got {item!r}")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"empty key in {item!r}")
    return key, parse_value(value.strip())


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "train.epochs", 5)`` sets ``cfg["train"]["epochs"] = 5``."""
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` updated with ``extra`` (shallow per key)."""
    out = copy.deepcopy(dict(base))
    out.update(copy.deepcopy(dict(extra)))
    return out
