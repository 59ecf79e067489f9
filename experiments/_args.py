"""The run configuration and choices of a command line (flags, ``--set``, ``--option``,
``--param``, seeds, balancer names), or a :class:`UsageError` saying what is wrong."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import config as cfgmod

__all__ = ["UsageError"]


class UsageError(Exception):
    """A user error: reported as ``error: ...`` with exit status 2."""


# ---------------------------------------------------------------------------- config
class _Flag(NamedTuple):
    """A command-line flag that sets one configuration entry (``section.key``; ``None``
    section = top level); the toy task has its own entry, or none (``toy_error``)."""

    attr: str
    flag: str
    entry: tuple[str | None, str]
    toy_entry: tuple[str | None, str] | None = None
    toy_error: str | None = None


_FLAGS: tuple[_Flag, ...] = (
    _Flag("model", "--model", ("model", "name"), ("model", "name")),
    _Flag("epochs", "--epochs", ("train", "epochs"),
          toy_error="the toy task counts steps, not epochs: use --steps"),
    _Flag("steps", "--steps", ("train", "max_steps"), ("toy", "steps")),
    _Flag("batch_size", "--batch-size", ("train", "batch_size"), ("train", "batch_size")),
    _Flag("lr", "--lr", ("optimizer", "lr"), ("toy", "lr")),
    _Flag("level", "--level", ("train", "level"), ("toy", "level")),
    _Flag("device", "--device", ("train", "device"), toy_error="the toy task runs on the CPU only"),
    _Flag("group", "--group", ("data", "group"), ("data", "group")),
    _Flag("data_path", "--data-path", ("data", "path"), ("data", "path")),
    _Flag("threads", "--threads", (None, "threads"), (None, "threads")),
    _Flag("regularizer", "--regularizer", ("regularizer", "name"),
          toy_error="the toy task has no representation to perturb"),
)  # fmt: skip


def _config_name(task: str, args: argparse.Namespace) -> str | None:
    """``--config``, else a census group's own configuration (its description and notes
    match the data), else ``None`` (the task's default)."""
    if args.config is None and task == "census" and args.group is not None:
        g = str(args.group).strip().lower().replace("-", "_")
        return f"census_group{g}" if g.isdigit() else f"census_{g}"
    return str(args.config) if args.config is not None else None


def _check_counts(args: argparse.Namespace) -> None:
    if getattr(args, "jobs", 1) < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    for flag in ("first_seed", "seed"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")


def _apply_flags(cfg: dict[str, Any], args: argparse.Namespace, is_toy: bool) -> dict[str, str]:
    """Write the flags given on the command line into ``cfg``; returns ``{dotted key: the
    flag that set it}`` for error messages."""
    origins: dict[str, str] = {}
    for f in _FLAGS:
        value = getattr(args, f.attr, None)
        if value is None or value is False or value == "":
            continue
        entry = f.toy_entry if is_toy else f.entry
        if entry is None:
            raise UsageError(f.toy_error or f"{f.flag} does not apply to the toy task")
        section, key = entry
        if f.attr == "group":
            value = cfgmod.parse_value(value)
        node = cfg if section is None else cfg.setdefault(section, {})
        if node is None and section == "regularizer":  # "regularizer": null in the config
            node = cfg[section] = {}
        if not isinstance(node, dict):
            raise UsageError(f"{f.flag}: configuration key {section!r} is not a section")
        node[key] = value
        origins[key if section is None else f"{section}.{key}"] = f"{f.flag} {value}"
    return origins


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    task = str(args.task).strip().lower()
    try:
        cfg = cfgmod.load_config(
            _config_name(task, args), task=task, overrides=args.set, validate=False
        )
    except cfgmod.ConfigError as e:
        raise UsageError(str(e)) from e
    _check_counts(args)
    origins = _apply_flags(cfg, args, task == "toy")
    try:
        cfgmod.validate_config(cfg, args.set, origins)
    except cfgmod.ConfigError as e:
        raise UsageError(str(e)) from e
    return cfg


def _options(items: Sequence[str], balancer: str) -> dict[str, Any]:
    """The ``--option KEY=VALUE`` items, checked against the options ``balancer`` takes."""
    out: dict[str, Any] = {}
    for item in items:
        try:
            k, v = cfgmod.parse_assignment(item)
            cfgmod.check_balancer_options(balancer, {k: v}, f"--option {item}")
        except cfgmod.ConfigError as e:
            raise UsageError(str(e)) from e
        out[k] = v
    return out


def _param(text: str, balancer: str) -> tuple[str, list[Any]]:
    if "=" not in text:
        raise UsageError(f"--param must look like NAME=V1,V2,..., got {text!r}")
    name, _, values = text.partition("=")
    vals = [cfgmod.parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not name.strip() or not vals:
        raise UsageError(f"--param must look like NAME=V1,V2,..., got {text!r}")
    try:
        cfgmod.check_balancer_options(balancer, {name.strip(): None}, f"--param {text}")
    except cfgmod.ConfigError as e:
        raise UsageError(str(e)) from e
    return name.strip(), vals


def _seeds(args: argparse.Namespace, cfg: dict[str, Any]) -> list[int]:
    n = args.seeds if args.seeds is not None else int(cfg.get("seeds", 1))
    if n < 1:
        raise UsageError(f"--seeds must be >= 1, got {n}")
    return list(range(args.first_seed, args.first_seed + n))


def _resolve(spec: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    from .runner import BalancerError, resolve_balancers

    try:
        return resolve_balancers(spec)
    except BalancerError as e:
        raise UsageError(str(e)) from e


def _tuned_variants(args: argparse.Namespace, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``--tuned-static`` run, checked against this comparison's settings."""
    if not getattr(args, "tuned_static", None):
        return []
    from .tune_static import load_tuned, tuned_label

    try:
        tuned = load_tuned(args.tuned_static, cfg)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return [
        {
            "balancer": "equal",
            "options": {"weights": tuned["weights"]},
            "label": tuned_label(tuned["num_runs"]),
        }
    ]
