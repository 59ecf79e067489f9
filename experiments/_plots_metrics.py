"""The test-metrics figure of a compare run (``metrics.png``): a bar per balancer and panel per
(task, metric) from a fixed axis floor, the single-task baseline, and, when EqualWeight ran, a
second block of each run's difference to EqualWeight's run of the same seed (in %, + = better).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import report
from ._plots_common import (
    AXIS_FLOOR,
    _arrow,
    _fig_legend,
    _figure,
    _floor_note,
    _fmt,
    _label,
    _palette,
    _seeds_phrase,
    _shared_limits,
)


def _paired_differences(
    results: Mapping[str, Any], columns: Sequence[tuple[str, str]], bals: Sequence[str]
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """``{(task, metric): {balancer: (mean, std, n)}}`` of ``100 * ±(M - M_EW) / |M_EW|``: each
    run against EqualWeight's run of the same seed, in %, signed so that + = better (metrics
    without a better direction keep the raw sign)."""
    runs = [r for r in results.get("runs", []) if r.get("metrics")]
    equal = {r["seed"]: r["metrics"] for r in runs if report.variant_of(r) == "equal"}
    out: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}
    for task, metric in columns:
        sign = -1.0 if report.HIGHER_IS_BETTER.get(metric) is False else 1.0
        per: dict[str, tuple[float, float, int]] = {}
        for b in bals:
            ds: list[float | None] = []
            for r in runs:
                if report.variant_of(r) != b or r["seed"] not in equal:
                    continue
                v = r["metrics"].get(task, {}).get(metric)
                e = equal[r["seed"]].get(task, {}).get(metric)
                if v is None or e is None or not math.isfinite(v) or not math.isfinite(e) or e == 0:
                    continue
                ds.append(100.0 * sign * (float(v) - float(e)) / abs(float(e)))
            per[b] = report.mean_std(ds)
        out[(task, metric)] = per
    return out


def _bars(
    ax: Any,
    stats: Sequence[tuple[float, float, int]],
    colors: Sequence[Any],
    bottom: float,
    signed: bool = False,
) -> list[float]:
    """Bars from ``bottom`` to each mean, error bars where n >= 2, the value above each bar;
    returns the values the axis must show."""
    x = np.arange(len(stats))
    means = np.array([m for m, _, _ in stats], dtype=float)
    heights = np.where(np.isfinite(means), means - bottom, 0.0)
    ax.bar(x, heights, bottom=bottom, color=list(colors), width=0.7)
    extent = [bottom]
    vertical = len(stats) > 4  # value labels turned upright when the bars are narrow
    for i, (m, s, n) in enumerate(stats):
        if not math.isfinite(m):
            ax.text(i, bottom, "n/a", ha="center", va="bottom", fontsize=7)
            continue
        err = s if n >= 2 and math.isfinite(s) else 0.0
        if err > 0:
            ax.errorbar([i], [m], yerr=[err], fmt="none", ecolor="k", capsize=4, lw=1.1)
        extent += [m - err, m + err]
        up = m >= bottom
        text = f"{m:+.2f} %" if signed else _fmt(m)
        ax.annotate(text, (i, (m + err) if up else (m - err)), textcoords="offset points",
                    xytext=(0, 2 if up else -2), ha="center", va="bottom" if up else "top",
                    fontsize=7, rotation=90 if vertical else 0)  # fmt: skip
    return extent


def _tick_labels(names: Sequence[str], ns: Sequence[int]) -> list[str]:
    top = max(ns) if ns else 0
    return [f"{b} (n={n})" if n != top else b for b, n in zip(names, ns)]


def _label_pad(n_bars: int) -> float:
    """Room for the value labels above and below the bars, as a share of the axis span (the
    labels turn upright past 4 bars)."""
    return 0.32 if n_bars > 4 else 0.14


def _dress_panel(ax: Any, names: Sequence[str], ns: Sequence[int], title: str, ylabel: str) -> None:
    """The tick labels (with a bar's n where it differs), title, y label and grid of a panel."""
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(_tick_labels(names, ns), rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _single_task_line(ax: Any, stat: Sequence[Any], handles: dict[str, Any]) -> list[float]:
    """The single-task baseline ``(mean, std, n)`` of a panel: a dashed line at the mean and,
    with n >= 2, its ±std band (kept in ``handles`` for the legend); returns the values the axis
    must show."""
    m, s, n = stat
    if not math.isfinite(m):
        return []
    handles["single-task"] = ax.axhline(m, color="k", ls="--", lw=1)
    ext = [m]
    if n >= 2 and math.isfinite(s):
        band = ax.axhspan(m - s, m + s, color="k", alpha=0.08)
        handles["single-task ± std"] = band
        ext += [m - s, m + s]
    return ext


def _draw_absolute(
    axes: Sequence[Any],
    columns: Sequence[tuple[str, str]],
    summary: Mapping[str, Any],
    bals: Sequence[str],
    colors: Mapping[str, Any],
    names: Mapping[str, str],
    handles: dict[str, Any],
) -> list[int]:
    """The top block: per (task, metric) a bar per balancer from the metric's axis floor and the
    single-task baseline, one y scale per metric; returns the n of every bar."""
    st = summary.get("single_task")
    extents: dict[str, list[float]] = {}
    ns_all: list[int] = []
    abs_axes: list[tuple[Any, str]] = []
    for ax, (task, metric) in zip(axes, columns):
        stats = [tuple(summary["balancers"][b]["metrics"][task][metric]) for b in bals]
        ns = [int(n) for _, _, n in stats]
        ns_all += ns
        floor = AXIS_FLOOR.get(metric, 0.0)
        ext = _bars(ax, stats, [colors[b] for b in bals], floor)
        if st is not None:
            ext += _single_task_line(ax, st["metrics"][task][metric], handles)
        extents.setdefault(metric, []).extend(ext)
        title = f"{task}: {_label(metric)} {_arrow(metric)}"
        ylabel = f"{_label(metric)} ({_floor_note(metric)})"
        _dress_panel(ax, [names[b] for b in bals], ns, title, ylabel)
        abs_axes.append((ax, metric))
    pad = _label_pad(len(bals))
    floors = {m: AXIS_FLOOR.get(m, 0.0) for m in extents}
    limits = _shared_limits(extents, floors, top_pad=pad, low_pad=pad)
    for ax, metric in abs_axes:
        if metric in limits:
            ax.set_ylim(*limits[metric])
    return ns_all


def _draw_differences(
    axes: Sequence[Any],
    columns: Sequence[tuple[str, str]],
    diffs: Mapping[tuple[str, str], Mapping[str, tuple[float, float, int]]],
    others: Sequence[str],
    colors: Mapping[str, Any],
    names: Mapping[str, str],
    handles: dict[str, Any],
) -> None:
    """The bottom block: per (task, metric) each balancer's paired difference to EqualWeight
    (:func:`_paired_differences`) from a line at 0, one y scale per metric that shows 0."""
    d_extents: dict[str, list[float]] = {}
    d_axes: list[tuple[Any, str]] = []
    for ax, (task, metric) in zip(axes, columns):
        stats = [diffs[(task, metric)][b] for b in others]
        ext = _bars(ax, stats, [colors[b] for b in others], 0.0, signed=True)
        d_extents.setdefault(metric, []).extend(ext)
        handles["EqualWeight (difference 0)"] = ax.axhline(0.0, color="k", lw=1.0)
        better = "" if _arrow(metric) == "" else ", + = better"
        title = f"{task}: {_label(metric)} vs EqualWeight"
        ylabel = f"vs EqualWeight, same seed (%{better})"
        _dress_panel(ax, [names[b] for b in others], [n for _, _, n in stats], title, ylabel)
        d_axes.append((ax, metric))
    pad = _label_pad(len(others))
    d_limits = _shared_limits(d_extents, {m: 0.0 for m in d_extents}, top_pad=pad, low_pad=pad)
    for ax, metric in d_axes:
        if metric in d_limits:
            lo, hi = d_limits[metric]
            span = hi - lo
            ax.set_ylim(min(lo, -0.1 * span), hi)


def _metrics_title(
    results: Mapping[str, Any],
    columns: Sequence[tuple[str, str]],
    ns_all: Sequence[int],
    paired: bool,
) -> str:
    """The figure title: the task, the seeds, and where the bars of each block start."""
    seeds = results.get("seeds", [])
    title = f"{results.get('task')}: test metrics, {_seeds_phrase(ns_all, seeds)}"
    chance = sorted({_label(m) for _, m in columns if m in AXIS_FLOOR})
    note = (
        f"bars from 0.5 (chance) for {' and '.join(chance)}, from 0 otherwise"
        if chance
        else "bars from 0"
    ) + "; one y scale per metric"
    if paired:
        note = (
            f"top: {note}.\nbottom: each run minus EqualWeight's run of the same seed, "
            "relative (%, + = better); one y scale per metric"
        )
    else:
        note += " (no EqualWeight run: no paired differences)"
    return f"{title}\n{note}"


def _metrics_figure(results: Mapping[str, Any], summary: Mapping[str, Any]) -> Any:
    """The figure :func:`experiments.plots.plot_compare_metrics` saves."""
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    columns = report.table_columns(results.get("tasks", []), cfg.get("table_metrics"))
    bals = [b for b, s in summary["balancers"].items() if s["n"] > 0]
    colors = dict(zip(bals, _palette(len(bals))))
    names = {b: report.display_name(b, None, level) for b in bals}
    others = [b for b in bals if b != "equal"]
    paired = "equal" in bals and bool(others)
    diffs = _paired_differences(results, columns, others) if paired else {}
    n_panels = max(1, len(columns))
    cols = n_panels if n_panels <= 5 else 4
    block = math.ceil(n_panels / cols)
    fig, axes = _figure(block * (2 if paired else 1), cols, 3.7, 3.4, 1.1)
    flat = list(axes.flat)

    handles: dict[str, Any] = {}  # legend label -> the artist it stands for
    ns_all = _draw_absolute(flat, columns, summary, bals, colors, names, handles)
    if paired:
        _draw_differences(flat[block * cols :], columns, diffs, others, colors, names, handles)
        for j in range(len(columns), block * cols):
            fig.delaxes(flat[block * cols + j])
    for j in range(len(columns), block * cols):
        fig.delaxes(flat[j])

    for label, h in handles.items():
        h.set_label(label)
    _fig_legend(fig, list(handles.values()))
    fig.suptitle(_metrics_title(results, columns, ns_all, paired), fontsize=10)
    return fig
