"""The figures of a sweep: each task metric against the swept parameter (``sweep_metrics.png``),
and the first metric of the first task against that of the second across the swept values, with
the true Pareto front when known (``sweep_front.png``); ± std error bars only where n >= 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np

from . import report
from ._plots_common import (
    _arrow,
    _drop_unused,
    _figure,
    _grid,
    _label,
    _seeds_phrase,
    _shared_limits,
)


class _Sweep(NamedTuple):
    """What both sweep figures draw: the swept ``values``, the (task, metric) ``columns``, their
    ``series`` of ``(mean, std)`` per value (:func:`experiments.report.sweep_series`), the swept
    ``param``, whether each value has an error bar (n >= 2), the seeds phrase of the titles and
    ``what`` the values are (final losses or test metrics)."""

    values: list[Any]
    columns: list[tuple[str, str]]
    series: dict[tuple[str, str], list[tuple[float, float]]]
    param: str
    has_err: list[bool]
    phrase: str
    what: str


def _sweep_counts(results: Mapping[str, Any]) -> list[int]:
    """Runs with metrics per swept value (the n of each mean)."""
    runs = [r for r in results.get("runs", []) if r.get("metrics")]
    return [sum(repr(r.get("value")) == repr(v) for r in runs) for v in results.get("values", [])]


def _sweep_data(results: Mapping[str, Any]) -> _Sweep:
    """The :class:`_Sweep` of a sweep's results."""
    values, columns, series = report.sweep_series(results)
    param = results.get("param", "param")
    counts = _sweep_counts(results)
    counts = counts if len(counts) == len(values) else [0] * len(values)
    has_err = [n >= 2 for n in counts]
    seeds = results.get("seeds", [])
    phrase = _seeds_phrase(counts or [0], seeds)
    what = "final losses" if results.get("task") == "toy" else "test metrics"
    return _Sweep(values, columns, series, param, has_err, phrase, what)


def _draw_metric(
    ax: Any, xs: Sequence[Any], series: Sequence[tuple[float, float]], has_err: Sequence[bool]
) -> list[float]:
    """One metric's means against the swept values, with error bars where n >= 2; returns the
    values the axis must show."""
    ms = [m for m, _ in series]
    ss = [s for _, s in series]
    ax.plot(xs, ms, marker="o", color="C0")
    ext = list(ms)
    for x, m, s, e in zip(xs, ms, ss, has_err):
        if e and math.isfinite(s):
            ax.errorbar([x], [m], yerr=[s], fmt="none", ecolor="C0", capsize=3)
            ext += [m - s, m + s]
    return ext


def _sweep_metrics_figure(results: Mapping[str, Any], sweep: _Sweep) -> Any:
    """The metrics figure :func:`experiments.plots.plot_sweep` saves: a panel per (task, metric),
    one y scale per metric, spanning the data."""
    values, columns, param = sweep.values, sweep.columns, sweep.param
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    n_panels = max(1, len(columns))
    rows, cols = _grid(n_panels)
    fig, axes = _figure(rows, cols, 4.2, 3.2, 0.8)
    flat = list(axes.flat)
    extents: dict[str, list[float]] = {}
    drawn: list[tuple[Any, str]] = []
    for ax, (task, metric) in zip(flat, columns):
        ext = _draw_metric(ax, xs, sweep.series[(task, metric)], sweep.has_err)
        extents.setdefault(metric, []).extend(ext)
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in values])
        ax.set_xlabel(param)
        ax.set_ylabel(_label(metric))
        ax.set_title(f"{task}: {_label(metric)} {_arrow(metric)}")
        ax.grid(alpha=0.3)
        drawn.append((ax, metric))
    limits = _shared_limits(extents, {}, top_pad=0.08)
    for ax, metric in drawn:
        if metric in limits:
            ax.set_ylim(*limits[metric])
    _drop_unused(fig, axes, len(columns))
    fig.suptitle(
        f"{report.display_name(results.get('balancer', '?'))}: {sweep.what} vs {param}, "
        f"{sweep.phrase}\ny axes span the data (not from 0), one scale per metric",
        fontsize=10,
    )
    return fig


def _label_points(
    ax: Any, values: Sequence[Any], xa: Sequence[float], xb: Sequence[float], param: str
) -> None:
    """Each finite point labelled with its swept value; coinciding points share one label."""
    at: dict[tuple[float, float], list[str]] = {}
    for v, x, y in zip(values, xa, xb):
        if math.isfinite(x) and math.isfinite(y):
            at.setdefault((x, y), []).append(str(v))
    for (x, y), vs in at.items():
        ax.annotate(f"{param}={', '.join(vs)}", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip


def _draw_front(ax: Any, a: tuple[str, str], b: tuple[str, str], sweep: _Sweep, front: Any) -> None:
    """Column ``a`` against column ``b`` across the swept values (error bars where n >= 2), and
    the true Pareto ``front`` when given."""
    xa = [m for m, _ in sweep.series[a]]
    xb = [m for m, _ in sweep.series[b]]
    ea = [s if e else 0.0 for (_, s), e in zip(sweep.series[a], sweep.has_err)]
    eb = [s if e else 0.0 for (_, s), e in zip(sweep.series[b], sweep.has_err)]
    ax.plot(xa, xb, marker="o", lw=1, color="C0")
    if any(sweep.has_err):
        ax.errorbar(xa, xb, xerr=ea, yerr=eb, fmt="none", ecolor="C0", capsize=3, lw=1)
    _label_points(ax, sweep.values, xa, xb, sweep.param)
    ax.set_xlabel(f"{a[0]} {_label(a[1])} {_arrow(a[1])}")
    ax.set_ylabel(f"{b[0]} {_label(b[1])} {_arrow(b[1])}")
    if front:
        arr = np.asarray(front, dtype=float)
        ax.plot(arr[:, 0], arr[:, 1], "k--", lw=1, label="Pareto front")
        ax.legend(fontsize=8)


def _sweep_front_figure(results: Mapping[str, Any], sweep: _Sweep) -> Any:
    """The front figure :func:`experiments.plots.plot_sweep` saves: the first metric of the
    first task against the first metric of the second task."""
    param = sweep.param
    tasks = [t["name"] for t in results.get("tasks", [])]
    firsts = []
    for t in tasks[:2]:
        col = next((c for c in sweep.columns if c[0] == t), None)
        if col is not None:
            firsts.append(col)
    fig, ax = plt.subplots(figsize=(5.4, 4.6), layout="constrained")
    if len(firsts) == 2:
        a, b = firsts
        _draw_front(ax, a, b, sweep, results.get("true_front"))
        more = f" (first 2 of {len(tasks)} tasks)" if len(tasks) > 2 else ""
        ax.set_title(
            f"{a[0]} {_label(a[1])} vs {b[0]} {_label(b[1])} across {param}{more}\n"
            f"{sweep.what}, {sweep.phrase}; axes span the data",
            fontsize=10,
        )
    else:
        ax.text(0.5, 0.5, "a front needs two tasks", ha="center", va="center")
        ax.set_title(f"front across {param}")
    ax.grid(alpha=0.3)
    return fig
