"""Experiment configurations: JSON files in ``experiments/configs/`` plus command-line overrides.

A configuration is a nested dict::

    {
      "task": "synthetic",                  # synthetic | census | toy | any tasks.load_task name
      "description": "...",
      "note": "...",                        # printed in the results table header
      "data": {...},                        # options of the task loader (tasks.load_task); the run
                                            # seed is passed as ``seed`` unless "seed" is given here
      "model": {"name": "mmoe", ...},       # mtl.models.build_model name and options
      "optimizer": {"name": "adam", "lr": 0.005},
      "scheduler": {"name": "cosine"},      # per-epoch LR schedule (cosine | step | null)
      "train": {"epochs": 30, "batch_size": 256, "early_stopping_patience": 5,
                "level": "representation", "eval_every": 1, "selection_metric": null,
                "max_steps": null, "device": "cpu"},
      "balancers": {"equal": {}, "mgda": {}, ...},   # options per balancer
      "single_task": true,                  # single-task baselines (needed for Δm)
      "seeds": 3,
      "delta_m_metrics": {"binary": ["auc"], "regression": ["mse"]},
      "table_metrics": {"binary": ["auc", "ne"], "regression": ["mse"]},
      "threads": 1,
      "toy": {...}                          # toy task only (see experiments.toy)
    }

Overrides use dotted keys with JSON values (``train.epochs=5``, ``data.group=1``,
``balancers.gradops.alpha=-2``); a value that is not valid JSON is taken as a string.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "available_configs",
    "default_config_name",
    "load_config",
    "parse_assignment",
    "parse_value",
    "set_dotted",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_TASK_DEFAULT_CONFIG = {"synthetic": "synthetic", "census": "census", "toy": "toy"}


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


def available_configs() -> list[str]:
    """Names of the configuration files shipped in ``experiments/configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def default_config_name(task: str) -> str | None:
    """The shipped configuration for ``task`` (``None`` for a task without one)."""
    return _TASK_DEFAULT_CONFIG.get(task)


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" and p.exists():
        return p
    if p.exists() and p.is_file():
        return p
    cand = CONFIG_DIR / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if cand.exists():
        return cand
    raise ConfigError(
        f"configuration {str(name_or_path)!r} not found (neither a file nor one of "
        f"{available_configs()} in {CONFIG_DIR})"
    )


def load_config(
    name_or_path: str | Path | None = None,
    *,
    task: str | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Load a configuration file and apply ``overrides`` (``"a.b=value"`` strings).

    Args:
        name_or_path: a JSON file, or the name of a file in ``experiments/configs/``;
            ``None``: the default configuration of ``task``.
        task: the task name; when the file's ``task`` differs, the file must say it is
            compatible (a census config for census) or an error is raised.
        overrides: dotted assignments applied in order.
    """
    if name_or_path is None:
        if task is None:
            raise ConfigError("give a task or a configuration file")
        default = default_config_name(task)
        cfg: dict[str, Any] = {"task": task} if default is None else _read(_resolve(default))
    else:
        cfg = _read(_resolve(name_or_path))
    if task is not None:
        file_task = str(cfg.get("task", task))
        if _family(file_task) != _family(task):
            raise ConfigError(
                f"configuration {str(name_or_path)!r} is for task {file_task!r}, not {task!r}"
            )
        cfg["task"] = task
    for item in overrides:
        key, value = parse_assignment(item)
        set_dotted(cfg, key, value)
    _fill_defaults(cfg)
    return cfg


def _family(task: str) -> str:
    t = str(task).lower()
    return "census" if t.startswith("census") else t


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a configuration must be a JSON object")
    cfg.setdefault("source", str(path))
    return cfg


def _fill_defaults(cfg: dict[str, Any]) -> None:
    cfg.setdefault("data", {})
    cfg.setdefault("model", {"name": "mmoe"})
    cfg["model"].setdefault("name", "mmoe")
    cfg.setdefault("optimizer", {"name": "adam", "lr": 1e-3})
    cfg["optimizer"].setdefault("name", "adam")
    cfg.setdefault("scheduler", None)
    train = cfg.setdefault("train", {})
    train.setdefault("epochs", 10)
    train.setdefault("batch_size", 256)
    train.setdefault("early_stopping_patience", 5)
    train.setdefault("level", "representation")
    train.setdefault("eval_every", 1)
    train.setdefault("selection_metric", None)
    cfg.setdefault("balancers", {})
    cfg.setdefault("single_task", False)
    cfg.setdefault("seeds", 3)
    cfg.setdefault("delta_m_metrics", {"binary": ["auc"], "regression": ["mse"]})
    cfg.setdefault("table_metrics", {"binary": ["auc", "ne"], "regression": ["mse"]})
    cfg.setdefault("threads", 1)
    cfg.setdefault("note", "")


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
