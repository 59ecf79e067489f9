"""The figures of how runs evolve during training: the task weights (or projection
coefficients) over the steps (``weights.png``), the validation metrics over the epochs
(``curves.png``), and the 2-D toy's trajectories over its loss contours (``trajectories.png``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mtl.plotting import plot_toy_trajectories as toy_plot

from . import report
from ._plots_common import (
    _arrow,
    _drop_unused,
    _fig_legend,
    _figure,
    _finite,
    _grid,
    _label,
    _palette,
    _seed_handles,
    _seed_styles,
    _shared_limits,
)

# ---------------------------------------------------------------------------- weights.png
SHARE_RATIO = 4.0
"""Weight panels share one y scale unless their largest values differ by more than this factor."""


def _draw_trace(ax: Any, trace: Sequence[Any], colors: Sequence[Any], ls: Any) -> list[float]:
    """One run's ``weights_trace`` ``[[step, [w per task]], ...]`` as a line per task (one colour
    per task, the seed's line style ``ls``); returns the finite values drawn."""
    steps = [s for s, _ in trace]
    w = np.asarray([ws for _, ws in trace], dtype=float)
    for k in range(w.shape[1]):
        ax.plot(steps, w[:, k], color=colors[k % len(colors)], ls=ls, lw=1.3, alpha=0.85)
    return _finite(w.ravel().tolist())


def _dress_weights_panel(ax: Any, name: str, coef: bool) -> None:
    """The title, axis labels and grid of a balancer's panel (``coef``: projection
    coefficients, any sign)."""
    ax.set_title(name + (" (coefficients)" if coef else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("coefficient (any sign)" if coef else "weight")
    ax.grid(alpha=0.3)


def _own_scale_kinds(
    bals: Sequence[str], kinds: Mapping[str, str], panel_values: Mapping[str, list[float]]
) -> set[str]:
    """The kinds (``"weights"``, ``"coefficients"``) whose panels get their own scale: their
    largest values differ by more than :data:`SHARE_RATIO`."""

    def peaks_of(kind: str) -> list[float]:
        return [
            max(map(abs, panel_values[b])) for b in bals if kinds[b] == kind and panel_values.get(b)
        ]

    own: set[str] = set()
    for kind in set(kinds.values()):
        tops = [p for p in peaks_of(kind) if p > 0]
        if tops and max(tops) > SHARE_RATIO * min(tops):
            own.add(kind)
    return own


def _set_weight_limits(
    axes: Sequence[Any],
    bals: Sequence[str],
    kinds: Mapping[str, str],
    own: set[str],
    extents: Mapping[str, list[float]],
    panel_values: Mapping[str, list[float]],
) -> None:
    """Every y axis from 0: one scale per kind, or the panel's own for the kinds in ``own``
    (said in the y label)."""
    limits = _shared_limits(extents, {k: 0.0 for k in extents}, top_pad=0.06)
    for ax, b in zip(axes, bals):
        kind = kinds[b]
        if kind in own:
            lim = _shared_limits({"p": panel_values[b]}, {"p": 0.0}, top_pad=0.06).get("p")
            if lim is not None:
                ax.set_ylim(*lim)
            ax.set_ylabel(ax.get_ylabel() + " (own scale)")
        elif kind in limits:
            ax.set_ylim(*limits[kind])


def _task_handles(names: Sequence[str], colors: Sequence[Any], k_max: int) -> list[Line2D]:
    """A legend entry per task colour (``task k`` past the named tasks)."""
    return [
        Line2D([], [], color=colors[k % len(colors)], lw=2,
               label=names[k] if k < len(names) else f"task {k}")
        for k in range(k_max)
    ]  # fmt: skip


def _weights_title(extents: Mapping[str, list[float]], own: set[str]) -> str:
    """The figure title: what is drawn, and which panels share a scale."""
    scale = "y axes include 0; " + "; ".join(
        f"the {kind.rstrip('s')} panels "
        + (
            "each have their own scale (their ranges differ widely)"
            if kind in own
            else "share one scale"
        )
        for kind in sorted(extents, key=lambda k: k != "weights")
    )
    return (
        "task weights (or coefficients) over training (window means)\n"
        f"colour = task, line style = seed; {scale}"
    )


def _weights_figure(results: Mapping[str, Any]) -> Any:
    """The figure :func:`experiments.plots.plot_weights` saves."""
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    runs = [r for r in results.get("runs", []) if r.get("weights_trace")]
    bals = list(dict.fromkeys(report.variant_of(r) for r in runs))
    names = [t["name"] for t in results.get("tasks", [])]
    k_max = max([len(names)] + [len(ws) for r in runs for _, ws in r["weights_trace"][:1]])
    seeds = sorted({r["seed"] for r in runs}, key=str)
    styles = _seed_styles(seeds)
    rows, cols = _grid(max(1, len(bals)))
    fig, axes = _figure(rows, cols, 4.3, 3.0, 1.2)
    flat = list(axes.flat)
    colors = _palette(k_max)
    extents: dict[str, list[float]] = {}  # kind -> the values of its panels
    kinds: dict[str, str] = {}  # balancer -> "weights" or "coefficients"
    panel_values: dict[str, list[float]] = {}  # balancer -> the values of its panel
    for ax, b in zip(flat, bals):
        mine = [r for r in runs if report.variant_of(r) == b]
        kind = kinds[b] = report.weights_kind(mine)
        for r in mine:
            values = _draw_trace(ax, r["weights_trace"], colors, styles[r["seed"]])
            extents.setdefault(kind, []).extend(values)
            panel_values.setdefault(b, []).extend(values)
        coef = kind == "coefficients"
        _dress_weights_panel(ax, report.display_name(b, None, level), coef)
    own = _own_scale_kinds(bals, kinds, panel_values)  # kinds whose panels get their own scale
    _set_weight_limits(flat, bals, kinds, own, extents, panel_values)
    if not bals:
        flat[0].text(0.5, 0.5, "no weight traces", ha="center", va="center")
        flat[0].axis("off")
    _drop_unused(fig, axes, max(1, len(bals)))
    _fig_legend(fig, _task_handles(names, colors, k_max) + _seed_handles(styles))
    fig.suptitle(_weights_title(extents, own), fontsize=10)
    return fig


# ---------------------------------------------------------------------------- curves.png
def _epoch_values(
    h: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]], selection: Any
) -> dict[str, float]:
    """The plotted values of one epoch record: ``{"auc": mean validation AUC of the binary
    tasks, "mse": mean validation MSE of the regression tasks}`` from its per-task ``valid``
    metrics, else read off its selection ``score`` when that is one kind of metric (``"score"``
    when it mixes AUC and -MSE)."""
    valid = h.get("valid")
    out: dict[str, float] = {}
    if valid:
        for kind, metric in (("binary", "auc"), ("regression", "mse")):
            vals = _finite(
                [valid.get(t["name"], {}).get(metric) for t in tasks if t["kind"] == kind]
            )
            if vals:
                out[metric] = float(np.mean(vals))
        return out
    score = h.get("score")
    if score is None or not math.isfinite(float(score)):
        return out
    score = float(score)
    kinds = {t["kind"] for t in tasks}
    if selection is None:
        if kinds == {"binary"}:
            out["auc"] = score
        elif kinds == {"regression"}:
            out["mse"] = -score
        else:
            out["score"] = score
    elif isinstance(selection, str) and selection in report.HIGHER_IS_BETTER:
        out[selection] = score if report.HIGHER_IS_BETTER[selection] else -score
    else:
        out["score"] = score
    return out


def _curve_title(key: str, tasks: Sequence[Mapping[str, Any]], selection: Any) -> str:
    kind = {"auc": "binary", "mse": "regression"}.get(key)
    if key == "score":
        what = "mean of AUC (binary) and −MSE (regression): mixed units"
        if selection is not None:
            what = f"selection metric {selection!r}"
        return f"validation selection score ↑\n({what})"
    names = [t["name"] for t in tasks if kind is None or t["kind"] == kind]
    over = (
        f"mean of {', '.join(names)}" if 1 < len(names) <= 3 else
        names[0] if len(names) == 1 else f"mean over {len(names)} tasks"
    )  # fmt: skip
    return f"validation {_label(key)} {_arrow(key)} ({over})"


def _curves_figure(results: Mapping[str, Any]) -> Any:
    """The figure :func:`experiments.plots.plot_curves` saves."""
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    selection = cfg.get("train", {}).get("selection_metric")
    tasks = list(results.get("tasks", []))
    runs = [r for r in results.get("runs", []) if r.get("history")]
    bals = list(dict.fromkeys(report.variant_of(r) for r in runs))
    colors = dict(zip(bals, _palette(len(bals))))
    seeds = sorted({r["seed"] for r in runs}, key=str)
    styles = _seed_styles(seeds)
    series: dict[str, list[tuple[str, Any, list[int], list[float]]]] = {}
    for r in runs:
        per: dict[str, tuple[list[int], list[float]]] = {}
        for h in r["history"]:
            for key, v in _epoch_values(h, tasks, selection).items():
                per.setdefault(key, ([], []))
                per[key][0].append(int(h["epoch"]))
                per[key][1].append(v)
        for key, (ep, vs) in per.items():
            series.setdefault(key, []).append((report.variant_of(r), r["seed"], ep, vs))
    order = ["auc", "mse"]
    keys = sorted(series, key=lambda k: (order.index(k) if k in order else len(order), k))
    fig, axes = _figure(1, max(1, len(keys)), 5.0, 3.8, 1.1)
    for ax, key in zip(axes[0], keys):
        epochs = sorted({e for _, _, ep, _ in series[key] for e in ep})
        for b, seed, ep, vs in series[key]:
            ax.plot(ep, vs, color=colors[b], ls=styles[seed], marker="o", ms=3.5, lw=1.4,
                    alpha=0.85)  # fmt: skip
        ax.set_title(_curve_title(key, tasks, selection), fontsize=10)
        ax.set_ylabel(_label(key) if key != "score" else "score")
        ax.set_xlabel("epoch")
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.margins(y=0.08)
        ax.grid(alpha=0.3)
    if not keys:
        axes[0][0].text(0.5, 0.5, "no validation history", ha="center", va="center")
        axes[0][0].axis("off")
    handles = [
        Line2D([], [], color=colors[b], lw=2, label=report.display_name(b, None, level))
        for b in bals
    ]
    _fig_legend(fig, handles + _seed_handles(styles))
    note = ""
    if "score" in series:
        note = "; per-task curves need the per-epoch 'valid' metrics in the runs' history"
    fig.suptitle(
        f"{results.get('task')}: validation metrics per epoch (all epochs; each y axis spans "
        f"its data){note}\ncolour = balancer, line style = seed",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------------------- trajectories.png
def _toy_trajectories_figure(
    results: Mapping[str, Any],
    *,
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    pareto: np.ndarray,
    seed: int | None = None,
) -> Any:
    """The figure :func:`experiments.plots.plot_toy_trajectories` saves."""
    runs = [r for r in results.get("runs", []) if r.get("trajectory")]
    if seed is None and runs:
        seed = runs[0]["seed"]
    runs = [r for r in runs if r["seed"] == seed]
    bals = list(dict.fromkeys(report.variant_of(r) for r in runs)) or ["(none)"]
    rows, cols = _grid(len(bals))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    x1 = grid[0]
    level = results.get("config", {}).get("toy", {}).get("level", "parameters")
    for i, b in enumerate(bals):
        ax = axes[i // cols][i % cols]
        trajectories = {
            _run_label(r, results.get("param")): np.asarray(r["trajectory"], dtype=float)
            for r in runs
            if report.variant_of(r) == b
        }
        toy_plot(
            trajectories, pareto=pareto, ax=ax, loss_grid=grid, levels=30,
            xlim=(float(x1.min()), float(x1.max())), ylim=(float(grid[1].min()), float(grid[1].max())),
            title=report.display_name(b, None, level), legend=i == 0,
        )  # fmt: skip
        ax.set_aspect("equal")
    _drop_unused(fig, axes, len(bals))
    steps = results.get("config", {}).get("toy", {}).get("steps")
    fig.suptitle(f"2-D toy: trajectories ({steps} Adam steps; o start, * end) over (L1 + L2) / 2")
    fig.tight_layout()
    return fig


def _run_label(run: Mapping[str, Any], param: str | None) -> str:
    """``start (x1, x2)``, with the swept value in a sweep."""
    label = f"start {tuple(run['start'])}"
    return label if "value" not in run else f"{param}={run['value']}, {label}"
