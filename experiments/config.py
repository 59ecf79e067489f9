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
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------- validation
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
    from .runner import _OPTIMIZERS

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
