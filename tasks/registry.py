"""Name-based access to the task families: ``load_task("census", group=2, seed=3)``.

Built-in names: ``"synthetic"`` (:func:`tasks.synthetic.make_synthetic`), ``"census"``
(:func:`tasks.census.load_census`; aliases ``"census-income"``, ``"census1"``, ``"census2"``,
``"census3"`` with the group preset) and ``"csv"`` (:func:`tasks.tabular_csv.load_csv`; the file
is the ``path`` option). The 2-D toy (:mod:`tasks.toy`) is not a dataset and is not listed.
:func:`register_task` adds a loader.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._data import DataSplits
from .census import load_census
from .synthetic import make_synthetic
from .tabular_csv import load_csv

__all__ = ["load_task", "available_tasks", "register_task"]


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


def _csv_loader(path: Any = None, **options: Any) -> DataSplits:
    if path is None:
        raise ValueError(
            "load_task('csv', ...) needs path=<file> (and numeric, categorical, tasks)"
        )
    return load_csv(path, **options)


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
    _csv_loader,
    "any delimited file with a header (options: path, numeric, categorical, tasks, seed, ...)",
)


def available_tasks() -> dict[str, str]:
    """Registered task names and their one-line descriptions."""
    return {k: v.description for k, v in sorted(_REGISTRY.items())}


def load_task(name: str, **options: Any) -> DataSplits:
    """Build the named task family's :class:`DataSplits` with ``options`` passed to its loader.

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[key].loader(**options)
