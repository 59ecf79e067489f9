"""Name-based access to the task families: ``load_task("census", group=2, seed=3)``.

Built-in names: ``"synthetic"`` (:func:`tasks.synthetic.make_synthetic`), ``"census"``
(:func:`tasks.census.load_census`; aliases ``"census-income"``, ``"census1"``, ``"census2"``,
``"census3"`` with the group preset) and ``"csv"`` (:func:`tasks.tabular_csv.load_csv`; the file
is the ``path`` option, and ``numeric``, ``categorical`` and ``tasks`` are required too). The 2-D
toy (:mod:`tasks.toy`) is not a dataset and is not listed. :func:`register_task` adds a loader.

The options a task takes are read from its loader's signature (:func:`task_options`):
:func:`load_task` rejects an unknown option (with a "did you mean") and names every missing
required one before loading anything, and reports every loader failure as a
:class:`~tasks._data.DataError` (a ``ValueError``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._data import DataError, DataSplits
from .census import load_census
from .synthetic import make_synthetic
from .tabular_csv import load_csv

__all__ = [
    "DataError",
    "TaskOptions",
    "available_tasks",
    "check_task_options",
    "load_task",
    "register_task",
    "task_options",
]


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., DataSplits]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_task(
    name: str, loader: Callable[..., DataSplits], description: str = "", *, overwrite: bool = False
) -> None:
    """Register ``loader(**options) -> DataSplits`` under ``name`` (case-insensitive).

    Raises:
        ValueError: ``name`` is taken and ``overwrite`` is false.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("task name must be non-empty")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = _Entry(loader, description)


register_task(
    "synthetic",
    make_synthetic,
    "MMoE synthetic regression with a task-correlation dial (options: num_tasks, correlation, "
    "num_samples, dim, loss_scales, seed, ...)",
)
register_task(
    "census",
    load_census,
    "UCI Census-Income (KDD), binary tasks (options: group 1/2/3, path, seed, train_path, ...)",
)
register_task("census-income", load_census, "alias of 'census'")
for _g in (1, 2, 3):
    register_task(
        f"census{_g}",
        functools.partial(load_census, _g),
        f"'census' with group={_g}",
    )
register_task(
    "csv",
    load_csv,
    "any delimited file with a header (required options: path, numeric, categorical, tasks; "
    "optional: task_kinds, delimiter, seed, fractions, missing_values, encoding, "
    "invalid_numbers, name)",
)


def available_tasks() -> dict[str, str]:
    """Registered task names and their one-line descriptions."""
    return {k: v.description for k, v in sorted(_REGISTRY.items())}


@dataclass(frozen=True)
class TaskOptions:
    """The keyword options of a task's loader.

    Attributes:
        required: options without a default.
        optional: options with a default.
        open: the loader also takes ``**options`` (any other key is passed on).
    """

    required: tuple[str, ...]
    optional: tuple[str, ...]
    open: bool

    @property
    def names(self) -> tuple[str, ...]:
        """Every named option, required first."""
        return self.required + self.optional


def _entry(name: str) -> _Entry:
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise DataError(
            f"unknown task {name!r}{_did_you_mean(key, _REGISTRY)}; available: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[key]


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def task_options(name: str) -> TaskOptions:
    """The options the loader of task ``name`` takes, read from its signature.

    Raises:
        DataError: unknown task name.
    """
    loader = _entry(name).loader
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a loader without a signature
        return TaskOptions((), (), True)
    required: list[str] = []
    optional: list[str] = []
    open_ = False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            open_ = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            (required if p.default is p.empty else optional).append(p.name)
    return TaskOptions(tuple(required), tuple(optional), open_)


def check_task_options(name: str, options: Mapping[str, Any] | Iterable[str]) -> None:
    """Check option names against the loader of task ``name`` without loading anything.

    Raises:
        DataError: unknown task, an option the loader does not take (with the closest valid
            names), or required options missing (all of them named).
    """
    spec = task_options(name)
    given = list(options)
    if not spec.open:
        unknown = [k for k in given if k not in spec.names]
        if unknown:
            k = unknown[0]
            raise DataError(
                f"task {name!r} has no option {k!r}{_did_you_mean(k, spec.names)}; its options "
                f"are {', '.join(spec.names)}"
            )
    missing = [k for k in spec.required if k not in given]
    if missing:
        raise DataError(
            f"task {name!r} needs the option{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (required: {', '.join(spec.required)})"
        )


def load_task(name: str, **options: Any) -> DataSplits:
    """Build the named task family's :class:`DataSplits` with ``options`` passed to its loader.

    Raises:
        DataError: (a ``ValueError``) unknown name (the message lists the available ones), an
            unknown or missing option (checked before loading), or any ``ValueError`` /
            ``TypeError`` the loader raises (bad option values, bad data; the original is
            chained).
        FileNotFoundError: the loader's data file does not exist.
    """
    entry = _entry(name)
    check_task_options(name, options)
    try:
        return entry.loader(**options)
    except DataError:
        raise
    except (ValueError, TypeError) as e:
        raise DataError(f"task {name!r}: {e}") from e
