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

:func:`validate_config` checks a whole configuration: every key must be one the code reads
(``train.*`` and ``toy.*`` from fixed lists; ``data.*`` from the task loader's signature,
``model.*``, ``optimizer.*``, ``scheduler.*``, ``regularizer.*`` and ``balancers.<name>.*``
from the signature of the class they configure), with a "did you mean" for a near miss, and
the fixed fields must have the right type (an integer field rejects ``1.7``; ``2.0`` is taken
as ``2``). Errors are :class:`ConfigError` and name the ``--set`` item or the file a bad key
came from.

The pieces live in private modules, re-exported here: the schema of the fixed fields and
:class:`ConfigError` (:mod:`experiments._config_schema`), the ``--set`` overrides
(:mod:`experiments._config_overrides`) and the validation (:mod:`experiments._config_validate`);
this module loads the files and fills the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# names re-exported from the modules they live in: other code and tests import them from here
from ._config_overrides import merged, parse_assignment, parse_value, set_dotted  # noqa: F401
from ._config_schema import (  # noqa: F401
    _LEVELS,
    _OPTIONAL_SECTIONS,
    _SECTIONS,
    TOP_FIELDS,
    TOP_KEYS,
    TOY_FIELDS,
    TRAIN_FIELDS,
    Check,
    ConfigError,
    _bool,
    _instance,
    _int,
    _list,
    _metric_lists,
    _number,
    _text,
)
from ._config_validate import (  # noqa: F401
    _balancer_key,
    _check_balancers,
    _check_model,
    _check_optimizer,
    _check_regularizer,
    _check_scheduler,
    _check_sections,
    _check_task,
    _signature_names,
    _suggest,
    _Validator,
    balancer_option_names,
    check_balancer_options,
    validate_config,
)

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "available_configs",
    "balancer_option_names",
    "check_balancer_options",
    "default_config_name",
    "load_config",
    "parse_assignment",
    "parse_value",
    "set_dotted",
    "validate_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_TASK_DEFAULT_CONFIG = {"synthetic": "synthetic", "census": "census", "toy": "toy"}


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
    validate: bool = True,
) -> dict[str, Any]:
    """Load a configuration file and apply ``overrides`` (``"a.b=value"`` strings).

    Args:
        name_or_path: a JSON file, or the name of a file in ``experiments/configs/``;
            ``None``: the default configuration of ``task``.
        task: the task name; when the file's ``task`` differs, the file must say it is
            compatible (a census config for census) or an error is raised.
        overrides: dotted assignments applied in order.
        validate: run :func:`validate_config` on the result (the command line passes False
            and validates after applying its own flags, e.g. ``--model``).

    Raises:
        ConfigError: a missing or invalid file, a malformed override, a section overridden
            by a non-object (``train=5``), and with ``validate`` any :func:`validate_config`
            error.
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
    overrides = list(overrides)
    for item in overrides:
        key, value = parse_assignment(item)
        try:
            set_dotted(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
    _check_sections(cfg, overrides)
    _fill_defaults(cfg)
    if validate:
        validate_config(cfg, overrides)
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
