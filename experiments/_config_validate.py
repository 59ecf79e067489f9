"""Validation of a whole configuration, with error messages that say where a bad key came from.

:func:`validate_config` checks every key against what the code reads: the fixed fields of
:mod:`experiments._config_schema`, and the options of the task loader, model, optimizer,
scheduler, regularizer and balancers from the signatures of what they configure
(:func:`_signature_names`). A near miss gets a "did you mean" (:func:`_suggest`), and
:class:`_Validator` names the ``--set`` item, flag or file an error came from.
:func:`check_balancer_options` does the same for the options of one balancer.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._config_overrides import parse_assignment
from ._config_schema import (
    _OPTIONAL_SECTIONS,
    _SECTIONS,
    TOP_FIELDS,
    TOP_KEYS,
    TOY_FIELDS,
    TRAIN_FIELDS,
    Check,
    ConfigError,
)

__all__ = ["balancer_option_names", "check_balancer_options", "validate_config"]


def _suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """``" Did you mean 'x'?"`` for the close matches of ``word`` (difflib), else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


class _Validator:
    def __init__(
        self,
        cfg: dict[str, Any],
        overrides: Iterable[str],
        origins: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.items: list[tuple[str, str]] = []  # (dotted key, where it was set), in order
        for item in overrides:
            try:
                key, _ = parse_assignment(item)
            except ConfigError:
                continue
            self.items.append((key, f"--set {item}"))
        self.items += list((origins or {}).items())

    def origin(self, key: str) -> str:
        """Where ``key`` came from: the last ``--set`` or flag that wrote it (or a key under
        it, or the section above it), else the configuration file."""
        for k, label in reversed(self.items):
            if k == key or k.startswith(key + ".") or key.startswith(k + "."):
                return f" (from {label})"
        src = self.cfg.get("source")
        return f" (in {src})" if src else ""

    def from_command_line(self, key: str) -> bool:
        """Whether a ``--set`` or a flag wrote ``key`` (or a key under it)."""
        return any(k == key or k.startswith(key + ".") for k, _ in self.items)

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"configuration key {key!r} {reason}{self.origin(key)}")

    def unknown(self, key: str, valid: Iterable[str], where: str) -> ConfigError:
        valid = sorted(valid)
        section, dot, last = key.rpartition(".")
        return ConfigError(
            f"unknown configuration key {key!r}{self.origin(key)}."
            f"{_suggest(last, valid, section + dot)} Valid keys {where}: "
            f"{', '.join(valid) if valid else '(none)'}"
        )

    def fields(self, section: str, node: dict[str, Any], schema: Mapping[str, Check]) -> None:
        """Check (and normalize in place) the entries of ``node`` against ``schema``."""
        for k in list(node):
            key = f"{section}.{k}" if section else k
            if k not in schema:
                raise self.unknown(key, schema, f"in {section!r}" if section else "(top level)")
            try:
                node[k] = schema[k](key, node[k])
            except ValueError as e:
                raise self.fail(key, str(e)) from None

    def options(
        self, section: str, node: Mapping[str, Any], valid: Sequence[str] | None, what: str
    ) -> None:
        if valid is None:  # the class takes **kwargs: anything goes
            return
        for k in node:
            if k not in valid:
                raise self.unknown(f"{section}.{k}", valid, f"in {section!r} ({what})")


def _signature_names(
    obj: Any, skip: Iterable[str] = ("self",), *, follow_kwargs: bool = False
) -> list[str] | None:
    """Keyword parameter names of ``obj`` (a class: its ``__init__``, walking up the MRO while
    ``**kwargs`` passes options on when ``follow_kwargs``); ``None`` when anything goes."""
    skip = set(skip)
    names: list[str] = []
    chain = [c for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    for target in chain:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        more = False
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip:
                if p.name not in names:
                    names.append(p.name)
        if not more:
            return names
        if not follow_kwargs or target is object:
            return None
    return None  # pragma: no cover - object.__init__ ends every chain


def balancer_option_names(name: str) -> list[str] | None:
    """The options balancer ``name`` takes (its constructor and the :class:`BalancedOptimizer`
    base); ``None`` when its class cannot be imported (nothing to check against).

    ``task_names`` is not among them: the runner passes the task names itself.
    """
    from balancers.registry import balancer_class

    try:
        cls = balancer_class(name)
    except Exception:  # unknown or not importable: reported elsewhere
        return None
    names = _signature_names(
        cls, ("self", "optimizer", "num_tasks", "task_names", "params", "defaults"),
        follow_kwargs=True,
    )  # fmt: skip
    return names


def check_balancer_options(name: str, options: Mapping[str, Any], origin: str) -> None:
    """Raise :class:`ConfigError` for an option ``name`` does not take (``origin`` says where it
    came from, e.g. ``"--option"``), with a "did you mean" and the valid options."""
    valid = balancer_option_names(name)
    if valid is None:
        return
    for k in options:
        if k not in valid:
            raise ConfigError(
                f"balancer {name!r} has no option {k!r} ({origin}).{_suggest(k, valid)} Its "
                f"options: {', '.join(sorted(valid))}"
            )


def _balancer_key(name: str) -> str | None:
    from balancers.registry import _ALIASES, BALANCERS

    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in BALANCERS else None


def _check_sections(cfg: Mapping[str, Any], overrides: Iterable[str] = ()) -> None:
    """Sections must be JSON objects (``--set train=5`` would replace one by a number)."""
    v = _Validator(dict(cfg), overrides)
    for name in _SECTIONS:
        if name in cfg and not isinstance(cfg[name], dict):
            raise v.fail(
                name,
                f"is a section and must be a JSON object, got {cfg[name]!r}; set its entries "
                f"instead, e.g. --set {name}.KEY=VALUE",
            )
    for name in _OPTIONAL_SECTIONS:
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise v.fail(name, f"must be a JSON object or null, got {cfg[name]!r}")
    sched = cfg.get("scheduler")
    if sched is not None and not isinstance(sched, (dict, str)):
        raise v.fail("scheduler", f"must be a name, an object or null, got {sched!r}")


def validate_config(
    cfg: dict[str, Any],
    overrides: Iterable[str] = (),
    origins: Mapping[str, str] | None = None,
) -> None:
    """Check every key and the fixed fields' types of a loaded configuration (normalizing
    integral floats in integer fields to ``int``).

    Args:
        cfg: the configuration (modified in place only by that normalization).
        overrides: the ``--set`` items applied to it, so that errors can name the one at
            fault.
        origins: dotted key -> the command-line flag that set it last (e.g.
            ``{"threads": "--threads -1"}``), for the same purpose.

    Raises:
        ConfigError: an unknown key (with a "did you mean" and the valid keys), a wrong type
            or value, an unknown task, model, optimizer, scheduler, regularizer or balancer
            name, or a required task option that is missing.
    """
    overrides = list(overrides)
    v = _Validator(cfg, overrides, origins)
    _check_sections(cfg, overrides)
    for k in cfg:
        if k not in TOP_KEYS:
            raise v.unknown(k, TOP_KEYS, "at the top level")
    top = {k: cfg[k] for k in cfg if k in TOP_FIELDS}
    v.fields("", top, TOP_FIELDS)
    cfg.update(top)
    task = str(cfg.get("task", ""))
    _check_task(v, task, cfg.get("data") or {})
    _check_model(v, cfg.get("model") or {})
    _check_optimizer(v, cfg.get("optimizer") or {})
    _check_scheduler(v, cfg.get("scheduler"))
    v.fields("train", cfg.get("train") or {}, TRAIN_FIELDS)
    v.fields("toy", cfg.get("toy") or {}, TOY_FIELDS)
    _check_regularizer(v, cfg.get("regularizer"))
    _check_balancers(v, cfg.get("balancers") or {})


def _check_task(v: _Validator, task: str, data: Mapping[str, Any]) -> None:
    from tasks.registry import available_tasks, task_options

    names = ["toy", *available_tasks()]
    if task.lower() not in names:
        raise ConfigError(
            f"unknown task {task!r} (--task).{_suggest(task.lower(), names)} Available: "
            f"{', '.join(names)}"
        )
    if task.lower() == "toy":
        if data:
            raise v.unknown(f"data.{next(iter(data))}", [], "for the toy task (it has no data)")
        return
    spec = task_options(task)
    v.options("data", data, None if spec.open else spec.names, f"options of task {task!r}")
    missing = [k for k in spec.required if k not in data and k != "seed"]
    if missing:
        examples = {
            "path": "--data-path FILE",
            "numeric": """--set 'data.numeric=["col", ...]'""",
            "categorical": """--set 'data.categorical=["col", ...]' (or [])""",
            "tasks": """--set 'data.tasks.NAME=col > 0' (one per task)""",
        }
        how = ", ".join(examples.get(k, f"--set data.{k}=VALUE") for k in missing)
        more = (
            "; see the CSV task in `python -m experiments --help`" if task.lower() == "csv" else ""
        )
        raise ConfigError(
            f"task {task!r} needs the data option{'s' if len(missing) > 1 else ''} "
            f"{', '.join('data.' + k for k in missing)}: give {how}{more}"
        )


def _check_model(v: _Validator, model: Mapping[str, Any]) -> None:
    from mtl.models import MODELS

    name = model.get("name", "mmoe")
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in MODELS:
        raise v.fail("model.name", f"names an unknown model {name!r}; choose from {sorted(MODELS)}")
    valid = _signature_names(MODELS[key], ("self", "num_numeric", "cardinalities", "num_tasks"))
    v.options("model", model, None if valid is None else ["name", *valid], f"options of {key}")


def _check_optimizer(v: _Validator, opt: Mapping[str, Any]) -> None:
    from ._build import _OPTIMIZERS

    name = str(opt.get("name", "adam")).lower()
    if name not in _OPTIMIZERS:
        raise v.fail(
            "optimizer.name",
            f"names an unknown optimizer {name!r}; choose from {sorted(_OPTIMIZERS)}",
        )
    valid = _signature_names(_OPTIMIZERS[name], ("self", "params"))
    v.options("optimizer", opt, None if valid is None else ["name", *valid], f"options of {name}")


def _check_scheduler(v: _Validator, spec: Any) -> None:
    import torch

    if spec is None:
        return
    opts = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(opts.get("name", "none")).lower()
    classes: dict[str, Any] = {
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
        "step": torch.optim.lr_scheduler.StepLR,
    }
    if name == "none":
        return
    if name not in classes:
        raise v.fail(
            "scheduler.name" if isinstance(spec, dict) else "scheduler",
            f"names an unknown scheduler {name!r}; choose from cosine, step, none",
        )
    valid = _signature_names(classes[name], ("self", "optimizer", "verbose"))
    if isinstance(spec, dict):
        v.options("scheduler", spec, None if valid is None else ["name", *valid], name)


def _check_regularizer(v: _Validator, spec: Mapping[str, Any] | None) -> None:
    if not spec:
        return
    name = str(spec.get("name", "none")).lower()
    others = [k for k in spec if k != "name"]
    if name in ("none", ""):
        if others:
            raise v.fail(
                f"regularizer.{others[0]}",
                "is set but no regularizer is chosen: add --regularizer scr|lspr (or "
                "--set regularizer.name=scr|lspr)",
            )
        return
    from balancers import LSPR, SCR

    classes: dict[str, Any] = {"lspr": LSPR, "scr": SCR}
    if name not in classes:
        raise v.fail(
            "regularizer.name", f"names an unknown regularizer {name!r}; choose none, scr or lspr"
        )
    valid = _signature_names(classes[name], ("self",))
    v.options("regularizer", spec, None if valid is None else ["name", *valid], name)


def _check_balancers(v: _Validator, section: Mapping[str, Any]) -> None:
    from balancers.registry import BALANCERS

    for name, options in section.items():
        if _balancer_key(name) is None:
            # a configuration file may carry the options of a balancer this installation
            # does not register (they are used only when that balancer runs); a name
            # typed on the command line must exist
            if not v.from_command_line(f"balancers.{name}"):
                continue
            raise v.unknown(f"balancers.{name}", BALANCERS, "in 'balancers' (balancer names)")
        if options is None:
            continue
        if not isinstance(options, dict):
            raise v.fail(f"balancers.{name}", f"must be a JSON object of options, got {options!r}")
        valid = balancer_option_names(name)
        v.options(f"balancers.{name}", options, valid, f"options of balancer {name!r}")
