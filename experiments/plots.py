"""Matplotlib figures of the experiments (Agg backend; PNG files only)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtl.plotting import plot_toy_trajectories as toy_plot  # noqa: E402

from . import report  # noqa: E402

__all__ = [
    "plot_compare_metrics",
    "plot_curves",
    "plot_sweep",
    "plot_toy_trajectories",
    "plot_weights",
]

_DPI = 110


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _palette(n: int) -> list[Any]:
    """``n`` colours: matplotlib's default cycle up to 10, ``tab20`` up to 20 (every balancer
    of ``--balancers all``, or 16 tasks, keeps its own colour), then ``tab20`` again."""
    if n <= 10:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        return [cycle[i % len(cycle)] for i in range(n)]
    tab20 = matplotlib.colormaps["tab20"]
    return [tab20(i % 20) for i in range(n)]


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def plot_compare_metrics(
    results: Mapping[str, Any], summary: Mapping[str, Any], path: Path
) -> Path:
    """One panel per (task, metric): a bar per balancer (mean ± std over seeds), the
    single-task baseline as a dashed line with its ±std band."""
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    columns = report.table_columns(results.get("tasks", []), cfg.get("table_metrics"))
    bals = [b for b, s in summary["balancers"].items() if s["n"] > 0]
    rows, cols = _grid(len(columns))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = _palette(len(bals))
    for i, (task, metric) in enumerate(columns):
        ax = axes[i // cols][i % cols]
        means = [summary["balancers"][b]["metrics"][task][metric][0] for b in bals]
        stds = [summary["balancers"][b]["metrics"][task][metric][1] for b in bals]
        x = np.arange(len(bals))
        ax.bar(x, means, yerr=stds, capsize=4, color=colors)
        st = summary.get("single_task")
        finite = [m for m in means if math.isfinite(m)]
        lo_hi = [m - s for m, s in zip(means, stds) if math.isfinite(m)] + [
            m + s for m, s in zip(means, stds) if math.isfinite(m)
        ]
        if st is not None:
            m, s, _ = st["metrics"][task][metric]
            if math.isfinite(m):
                ax.axhline(m, color="k", ls="--", lw=1, label="single-task")
                ax.axhspan(m - s, m + s, color="k", alpha=0.08)
                lo_hi += [m - s, m + s]
                ax.legend(loc="best", fontsize=8)
        if finite and lo_hi:
            lo, hi = min(lo_hi), max(lo_hi)
            pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-6
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [report.display_name(b, None, level) for b in bals], rotation=30, ha="right"
        )
        arrow = "↑" if report.HIGHER_IS_BETTER.get(metric, True) else "↓"
        ax.set_title(f"{task}: {report.METRIC_LABELS.get(metric, metric)} {arrow}")
        ax.grid(axis="y", alpha=0.3)
    for j in range(len(columns), rows * cols):
        axes[j // cols][j % cols].axis("off")
    n = len(results.get("seeds", []))
    fig.suptitle(f"{results.get('task')}: test metrics (mean ± std over {n} seeds)")
    fig.tight_layout()
    return _save(fig, path)


def plot_weights(results: Mapping[str, Any], path: Path) -> Path:
    """Task weights over training, one panel per balancer, one line per task and seed."""
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    runs = [r for r in results.get("runs", []) if r.get("weights_trace")]
    bals = list(dict.fromkeys(report.variant_of(r) for r in runs))
    names = [t["name"] for t in results.get("tasks", [])]
    k_max = max([len(names)] + [len(ws) for r in runs for _, ws in r["weights_trace"][:1]])
    rows, cols = _grid(max(1, len(bals)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colors = _palette(k_max)
    for i, b in enumerate(bals):
        ax = axes[i // cols][i % cols]
        for j, r in enumerate(r for r in runs if report.variant_of(r) == b):
            steps = [s for s, _ in r["weights_trace"]]
            w = np.asarray([ws for _, ws in r["weights_trace"]], dtype=float)
            for k in range(w.shape[1]):
                label = (names[k] if k < len(names) else f"task {k}") if j == 0 else None
                ax.plot(steps, w[:, k], color=colors[k % len(colors)], alpha=0.8 if j == 0 else 0.35,
                        lw=1.2, label=label)  # fmt: skip
        mine = [r for r in runs if report.variant_of(r) == b]
        coef = report.weights_kind(mine) == "coefficients"
        ax.set_title(report.display_name(b, None, level) + (" (coefficients)" if coef else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("coefficient (any sign)" if coef else "weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for j in range(len(bals), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("task weights (or coefficients) over training (window means; one line per seed)")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(results: Mapping[str, Any], path: Path) -> Path:
    """Validation score per epoch (one line per balancer and seed)."""
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    runs = [r for r in results.get("runs", []) if r.get("history")]
    bals = list(dict.fromkeys(report.variant_of(r) for r in runs))
    colors = _palette(len(bals))
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    late: list[float] = []  # scores after the first epochs set the y range
    for r in runs:
        n = len(r["history"])
        late += [
            h["score"]
            for h in r["history"][max(1, n // 5) :]
            if h.get("score") is not None and math.isfinite(h["score"])
        ]
    for i, b in enumerate(bals):
        for j, r in enumerate(r for r in runs if report.variant_of(r) == b):
            pts = [(h["epoch"], h["score"]) for h in r["history"] if h.get("score") is not None]
            if not pts:
                continue
            ep, sc = zip(*pts)
            ax.plot(ep, sc, color=colors[i % len(colors)], alpha=0.9 if j == 0 else 0.35,
                    label=report.display_name(b, None, level) if j == 0 else None)  # fmt: skip
    if late:
        lo, hi = min(late), max(late)
        pad = 0.1 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-6
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("epoch")
    sel = cfg.get("train", {}).get("selection_metric") or "mean AUC (binary) / −MSE (regression)"
    ax.set_ylabel(f"validation score ({sel})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep(results: Mapping[str, Any], metrics_path: Path, front_path: Path) -> list[Path]:
    """Each task metric against the swept parameter, and task 1 vs task 2 as a front."""
    values, columns, series = report.sweep_series(results)
    param = results.get("param", "param")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    rows, cols = _grid(len(columns))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for i, (task, metric) in enumerate(columns):
        ax = axes[i // cols][i % cols]
        ms = [m for m, _ in series[(task, metric)]]
        ss = [s for _, s in series[(task, metric)]]
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3)
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in values])
        ax.set_xlabel(param)
        arrow = "↑" if report.HIGHER_IS_BETTER.get(metric, True) else "↓"
        ax.set_title(f"{task}: {report.METRIC_LABELS.get(metric, metric)} {arrow}")
        ax.grid(alpha=0.3)
    for j in range(len(columns), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{report.display_name(results.get('balancer', '?'))}: metrics vs {param}")
    fig.tight_layout()
    out = [_save(fig, metrics_path)]

    # front: the first metric of task 1 vs the first metric of task 2
    tasks = [t["name"] for t in results.get("tasks", [])]
    firsts = []
    for t in tasks[:2]:
        col = next((c for c in columns if c[0] == t), None)
        if col is not None:
            firsts.append(col)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    if len(firsts) == 2:
        a, b = firsts
        xa = [m for m, _ in series[a]]
        xb = [m for m, _ in series[b]]
        ea = [s for _, s in series[a]]
        eb = [s for _, s in series[b]]
        ax.errorbar(xa, xb, xerr=ea, yerr=eb, marker="o", capsize=3, lw=1)
        for v, x, y in zip(values, xa, xb):
            if math.isfinite(x) and math.isfinite(y):
                ax.annotate(f"{param}={v}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)  # fmt: skip
        ax.set_xlabel(f"{a[0]} {report.METRIC_LABELS.get(a[1], a[1])}")
        ax.set_ylabel(f"{b[0]} {report.METRIC_LABELS.get(b[1], b[1])}")
        front = results.get("true_front")
        if front:
            arr = np.asarray(front, dtype=float)
            ax.plot(arr[:, 0], arr[:, 1], "k--", lw=1, label="Pareto front")
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "a front needs two tasks", ha="center", va="center")
    ax.grid(alpha=0.3)
    ax.set_title(f"task 1 vs task 2 across {param}")
    fig.tight_layout()
    out.append(_save(fig, front_path))
    return out


def plot_toy_trajectories(
    results: Mapping[str, Any],
    path: Path,
    *,
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    pareto: np.ndarray,
    seed: int | None = None,
) -> Path:
    """One panel per balancer: trajectories from every start (one colour per start) over the
    contours of (L1 + L2) / 2, drawn by :func:`mtl.plotting.plot_toy_trajectories`.

    ``grid`` is the precomputed ``(X1, X2, L)`` of :func:`tasks.toy.loss_grid`; ``pareto`` the
    Pareto set in ``x`` space; ``seed`` selects the runs (default: the first run's seed).
    """
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
    for j in range(len(bals), rows * cols):
        axes[j // cols][j % cols].axis("off")
    steps = results.get("config", {}).get("toy", {}).get("steps")
    fig.suptitle(f"2-D toy: trajectories ({steps} Adam steps; o start, * end) over (L1 + L2) / 2")
    fig.tight_layout()
    return _save(fig, path)


def _run_label(run: Mapping[str, Any], param: str | None) -> str:
    """``start (x1, x2)``, with the swept value in a sweep."""
    label = f"start {tuple(run['start'])}"
    return label if "value" not in run else f"{param}={run['value']}, {label}"
