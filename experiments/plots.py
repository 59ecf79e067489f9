"""Matplotlib figures of the experiments (Agg backend; PNG files only).

Conventions of every figure here:

* a value axis says what its range is. Bars of absolute metrics start at a fixed, documented
  baseline: AUC and GAUC at 0.5 (chance), every other metric at 0; never at a value taken from
  the data. Lines of a metric over epochs or over a swept parameter span the data (all epochs,
  all values) and say so in the figure title;
* differences are drawn as differences and labelled as such ("vs EqualWeight, same seed");
* error bars (sample std over seeds) only where there are n >= 2 seeds; with one seed the
  figure says "n = 1: no error bar";
* panels meant to be compared share their y scale: one scale per metric, and for the weights one
  scale for the weights and one for the coefficients (GradOPS, PCGrad), as the titles say;
* one colour per balancer (or per task), one line style per seed, with a legend entry "seed s".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mtl.plotting import plot_toy_trajectories as toy_plot  # noqa: E402

from . import report  # noqa: E402

__all__ = [
    "AXIS_FLOOR",
    "plot_compare_metrics",
    "plot_curves",
    "plot_sweep",
    "plot_toy_trajectories",
    "plot_weights",
]

_DPI = 110

AXIS_FLOOR = {"auc": 0.5, "gauc": 0.5}
"""Where the bars of a metric start: 0.5 (chance) for AUC and GAUC, 0 for every other metric."""

_SEED_STYLES: list[Any] = [
    "-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2)),
]  # fmt: skip


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


def _figure(rows: int, cols: int, w: float, h: float, extra_h: float = 0.9) -> tuple[Any, Any]:
    """A constrained-layout figure of ``rows x cols`` panels of ``w x h`` inches, with
    ``extra_h`` inches for the title and the legend."""
    fig = plt.figure(figsize=(w * cols, h * rows + extra_h), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _drop_unused(fig: Any, axes: Any, used: int) -> None:
    """Remove the panels past the first ``used`` (no empty frames in the figure)."""
    flat = list(np.asarray(axes).flat)
    for ax in flat[used:]:
        fig.delaxes(ax)


def _seed_styles(seeds: Sequence[Any]) -> dict[Any, Any]:
    """One line style per seed, in the order given."""
    return {s: _SEED_STYLES[i % len(_SEED_STYLES)] for i, s in enumerate(seeds)}


def _seed_handles(styles: Mapping[Any, Any]) -> list[Line2D]:
    return [
        Line2D([], [], color="0.25", ls=ls, lw=1.4, label=f"seed {s}") for s, ls in styles.items()
    ]


def _fig_legend(fig: Any, handles: Sequence[Any]) -> None:
    if handles:
        fig.legend(handles=list(handles), loc="outside lower center", ncol=min(len(handles), 8),
                   fontsize=8, frameon=False)  # fmt: skip


def _label(metric: str) -> str:
    return str(report.METRIC_LABELS.get(metric, metric))


def _arrow(metric: str) -> str:
    if metric not in report.HIGHER_IS_BETTER:
        return ""
    return "↑" if report.HIGHER_IS_BETTER[metric] else "↓"


def _floor_note(metric: str) -> str:
    floor = AXIS_FLOOR.get(metric, 0.0)
    return f"bars from {floor:g} = chance" if metric in AXIS_FLOOR else f"bars from {floor:g}"


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    if 0.01 <= abs(v) < 10:
        return f"{v:.4f}"
    return f"{v:.1f}" if 10 <= abs(v) < 1e5 else f"{v:.3g}"


def _finite(xs: Sequence[float]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _shared_limits(
    extents: Mapping[str, list[float]],
    include: Mapping[str, float],
    top_pad: float = 0.14,
    low_pad: float = 0.06,
) -> dict[str, tuple[float, float]]:
    """``{key: (lo, hi)}`` spanning every value of ``extents[key]`` and ``include[key]`` (the
    axis floor), with ``top_pad`` of the span added on top (room for the value labels) and
    ``low_pad`` below when a value lies below the floor (or there is no floor)."""
    out: dict[str, tuple[float, float]] = {}
    for key, vals in extents.items():
        floor = include.get(key)
        xs = _finite(vals) + ([] if floor is None else [floor])
        if not xs:
            continue
        lo, hi = min(xs), max(xs)
        span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
        below = 0.0 if floor is not None and lo >= floor else low_pad * span
        out[key] = (lo - below, hi + top_pad * span)
    return out


def _seeds_phrase(ns: Sequence[int], seeds: Sequence[Any]) -> str:
    """ "mean ± std over 3 seeds (0, 1, 2)", "n = 1 seed (0): no error bar", or "mean ± std over
    5 runs (seed 0)" when a mean is over more runs than seeds (the toy's starting points)."""
    n = max(ns) if ns else len(seeds)
    listed = ", ".join(map(str, seeds))
    if n <= 1:
        return f"n = 1 seed ({listed}): no error bar" if seeds else "n = 1: no error bar"
    if seeds and n > len(seeds):
        text = f"mean ± std over {n} runs (seed{'s' if len(seeds) > 1 else ''} {listed})"
    else:
        text = f"mean ± std over {n} seeds" + (f" ({listed})" if seeds else "")
    if min(ns) < 2:
        text += "; n = 1: no error bar"
    return text


# ---------------------------------------------------------------------------- metrics.png
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


def plot_compare_metrics(
    results: Mapping[str, Any], summary: Mapping[str, Any], path: Path
) -> Path:
    """Test metrics, one panel per (task, metric).

    Top block: a bar per balancer (mean over seeds; ± std error bars only with n >= 2), from a
    fixed baseline (AUC/GAUC: 0.5 = chance; others: 0), the single-task baseline as a dashed
    line (with its ±std band when n >= 2), one y scale per metric. Bottom block (when
    EqualWeight ran): each balancer's run minus EqualWeight's run of the same seed, relative, in
    % (+ = better), one y scale per metric.
    """
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

    st = summary.get("single_task")
    handles: dict[str, Any] = {}
    extents: dict[str, list[float]] = {}
    ns_all: list[int] = []
    abs_axes: list[tuple[Any, str]] = []
    for i, (task, metric) in enumerate(columns):
        ax = flat[i]
        stats = [tuple(summary["balancers"][b]["metrics"][task][metric]) for b in bals]
        ns = [int(n) for _, _, n in stats]
        ns_all += ns
        floor = AXIS_FLOOR.get(metric, 0.0)
        ext = _bars(ax, stats, [colors[b] for b in bals], floor)
        if st is not None:
            m, s, n = st["metrics"][task][metric]
            if math.isfinite(m):
                handles["single-task"] = ax.axhline(m, color="k", ls="--", lw=1)
                ext.append(m)
                if n >= 2 and math.isfinite(s):
                    band = ax.axhspan(m - s, m + s, color="k", alpha=0.08)
                    handles["single-task ± std"] = band
                    ext += [m - s, m + s]
        extents.setdefault(metric, []).extend(ext)
        ax.set_xticks(np.arange(len(bals)))
        ax.set_xticklabels(_tick_labels([names[b] for b in bals], ns), rotation=30, ha="right")
        ax.set_title(f"{task}: {_label(metric)} {_arrow(metric)}")
        ax.set_ylabel(f"{_label(metric)} ({_floor_note(metric)})")
        ax.grid(axis="y", alpha=0.3)
        abs_axes.append((ax, metric))
    pad = 0.32 if len(bals) > 4 else 0.14  # room for the value labels (upright past 4 bars)
    floors = {m: AXIS_FLOOR.get(m, 0.0) for m in extents}
    limits = _shared_limits(extents, floors, top_pad=pad, low_pad=pad)
    for ax, metric in abs_axes:
        if metric in limits:
            ax.set_ylim(*limits[metric])

    if paired:
        d_extents: dict[str, list[float]] = {}
        d_axes: list[tuple[Any, str]] = []
        for i, (task, metric) in enumerate(columns):
            ax = flat[block * cols + i]
            stats = [diffs[(task, metric)][b] for b in others]
            ext = _bars(ax, stats, [colors[b] for b in others], 0.0, signed=True)
            d_extents.setdefault(metric, []).extend(ext)
            handles["EqualWeight (difference 0)"] = ax.axhline(0.0, color="k", lw=1.0)
            ax.set_xticks(np.arange(len(others)))
            ax.set_xticklabels(
                _tick_labels([names[b] for b in others], [n for _, _, n in stats]),
                rotation=30, ha="right",
            )  # fmt: skip
            better = "" if _arrow(metric) == "" else ", + = better"
            ax.set_title(f"{task}: {_label(metric)} vs EqualWeight")
            ax.set_ylabel(f"vs EqualWeight, same seed (%{better})")
            ax.grid(axis="y", alpha=0.3)
            d_axes.append((ax, metric))
        pad = 0.32 if len(others) > 4 else 0.14
        d_limits = _shared_limits(d_extents, {m: 0.0 for m in d_extents}, top_pad=pad, low_pad=pad)
        for ax, metric in d_axes:
            if metric in d_limits:
                lo, hi = d_limits[metric]
                span = hi - lo
                ax.set_ylim(min(lo, -0.1 * span), hi)
        for j in range(len(columns), block * cols):
            fig.delaxes(flat[block * cols + j])
    for j in range(len(columns), block * cols):
        fig.delaxes(flat[j])

    for label, h in handles.items():
        h.set_label(label)
    _fig_legend(fig, list(handles.values()))
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
    fig.suptitle(f"{title}\n{note}", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------- weights.png
SHARE_RATIO = 4.0
"""Weight panels share one y scale unless their largest values differ by more than this factor."""


def plot_weights(results: Mapping[str, Any], path: Path) -> Path:
    """Task weights over training, one panel per balancer: one colour per task, one line style
    per seed.

    Every y axis includes 0 (a ±2 % jitter looks like one). The weight panels share one scale
    and the coefficient panels (GradOPS, PCGrad: projection coefficients, any sign) another,
    unless the panels' largest values differ by more than :data:`SHARE_RATIO` (e.g. MGDA's
    weights summing to 1 next to MultiBalance's of 50): then each of those panels has its own
    scale from 0, and the figure title says so.
    """
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
    extents: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    panel_values: dict[str, list[float]] = {}
    for i, b in enumerate(bals):
        ax = flat[i]
        mine = [r for r in runs if report.variant_of(r) == b]
        kind = kinds[b] = report.weights_kind(mine)
        for r in mine:
            steps = [s for s, _ in r["weights_trace"]]
            w = np.asarray([ws for _, ws in r["weights_trace"]], dtype=float)
            for k in range(w.shape[1]):
                ax.plot(steps, w[:, k], color=colors[k % len(colors)], ls=styles[r["seed"]],
                        lw=1.3, alpha=0.85)  # fmt: skip
            extents.setdefault(kind, []).extend(_finite(w.ravel().tolist()))
            panel_values.setdefault(b, []).extend(_finite(w.ravel().tolist()))
        coef = kind == "coefficients"
        ax.set_title(report.display_name(b, None, level) + (" (coefficients)" if coef else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("coefficient (any sign)" if coef else "weight")
        ax.grid(alpha=0.3)

    def peaks_of(kind: str) -> list[float]:
        return [
            max(map(abs, panel_values[b])) for b in bals if kinds[b] == kind and panel_values.get(b)
        ]

    own: set[str] = set()  # kinds whose panels get their own scale
    for kind in set(kinds.values()):
        tops = [p for p in peaks_of(kind) if p > 0]
        if tops and max(tops) > SHARE_RATIO * min(tops):
            own.add(kind)
    limits = _shared_limits(extents, {k: 0.0 for k in extents}, top_pad=0.06)
    for i, b in enumerate(bals):
        kind = kinds[b]
        if kind in own:
            lim = _shared_limits({"p": panel_values[b]}, {"p": 0.0}, top_pad=0.06).get("p")
            if lim is not None:
                flat[i].set_ylim(*lim)
            flat[i].set_ylabel(flat[i].get_ylabel() + " (own scale)")
        elif kind in limits:
            flat[i].set_ylim(*limits[kind])
    if not bals:
        flat[0].text(0.5, 0.5, "no weight traces", ha="center", va="center")
        flat[0].axis("off")
    _drop_unused(fig, axes, max(1, len(bals)))
    task_handles = [
        Line2D([], [], color=colors[k % len(colors)], lw=2,
               label=names[k] if k < len(names) else f"task {k}")
        for k in range(k_max)
    ]  # fmt: skip
    _fig_legend(fig, task_handles + _seed_handles(styles))
    scale = "y axes include 0; " + "; ".join(
        f"the {kind.rstrip('s')} panels "
        + (
            "each have their own scale (their ranges differ widely)"
            if kind in own
            else "share one scale"
        )
        for kind in sorted(extents, key=lambda k: k != "weights")
    )
    fig.suptitle(
        "task weights (or coefficients) over training (window means)\n"
        f"colour = task, line style = seed; {scale}",
        fontsize=10,
    )
    return _save(fig, path)


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


def plot_curves(results: Mapping[str, Any], path: Path) -> Path:
    """Validation metrics per epoch, every epoch: one panel per metric kind (AUC of the binary
    tasks, MSE of the regression tasks), one colour per balancer, one line style per seed; each
    y axis spans all the values drawn."""
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
    return _save(fig, path)


# ---------------------------------------------------------------------------- sweep
def _sweep_counts(results: Mapping[str, Any]) -> list[int]:
    """Runs with metrics per swept value (the n of each mean)."""
    runs = [r for r in results.get("runs", []) if r.get("metrics")]
    return [sum(repr(r.get("value")) == repr(v) for r in runs) for v in results.get("values", [])]


def plot_sweep(results: Mapping[str, Any], metrics_path: Path, front_path: Path) -> list[Path]:
    """Each task metric against the swept parameter (one y scale per metric, spanning the
    data), and the first metric of the first task against that of the second as a front, both
    with ± std error bars only where n >= 2."""
    values, columns, series = report.sweep_series(results)
    param = results.get("param", "param")
    counts = _sweep_counts(results)
    counts = counts if len(counts) == len(values) else [0] * len(values)
    has_err = [n >= 2 for n in counts]
    seeds = results.get("seeds", [])
    phrase = _seeds_phrase(counts or [0], seeds)
    what = "final losses" if results.get("task") == "toy" else "test metrics"
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    n_panels = max(1, len(columns))
    rows, cols = _grid(n_panels)
    fig, axes = _figure(rows, cols, 4.2, 3.2, 0.8)
    flat = list(axes.flat)
    extents: dict[str, list[float]] = {}
    drawn: list[tuple[Any, str]] = []
    for i, (task, metric) in enumerate(columns):
        ax = flat[i]
        ms = [m for m, _ in series[(task, metric)]]
        ss = [s for _, s in series[(task, metric)]]
        ax.plot(xs, ms, marker="o", color="C0")
        ext = list(ms)
        for x, m, s, e in zip(xs, ms, ss, has_err):
            if e and math.isfinite(s):
                ax.errorbar([x], [m], yerr=[s], fmt="none", ecolor="C0", capsize=3)
                ext += [m - s, m + s]
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
        f"{report.display_name(results.get('balancer', '?'))}: {what} vs {param}, {phrase}"
        "\ny axes span the data (not from 0), one scale per metric",
        fontsize=10,
    )
    out = [_save(fig, metrics_path)]

    # front: the first metric of the first task vs the first metric of the second task
    tasks = [t["name"] for t in results.get("tasks", [])]
    firsts = []
    for t in tasks[:2]:
        col = next((c for c in columns if c[0] == t), None)
        if col is not None:
            firsts.append(col)
    fig, ax = plt.subplots(figsize=(5.4, 4.6), layout="constrained")
    if len(firsts) == 2:
        a, b = firsts
        xa = [m for m, _ in series[a]]
        xb = [m for m, _ in series[b]]
        ea = [s if e else 0.0 for (_, s), e in zip(series[a], has_err)]
        eb = [s if e else 0.0 for (_, s), e in zip(series[b], has_err)]
        ax.plot(xa, xb, marker="o", lw=1, color="C0")
        if any(has_err):
            ax.errorbar(xa, xb, xerr=ea, yerr=eb, fmt="none", ecolor="C0", capsize=3, lw=1)
        at: dict[tuple[float, float], list[str]] = {}  # coinciding points share one label
        for v, x, y in zip(values, xa, xb):
            if math.isfinite(x) and math.isfinite(y):
                at.setdefault((x, y), []).append(str(v))
        for (x, y), vs in at.items():
            ax.annotate(f"{param}={', '.join(vs)}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
        ax.set_xlabel(f"{a[0]} {_label(a[1])} {_arrow(a[1])}")
        ax.set_ylabel(f"{b[0]} {_label(b[1])} {_arrow(b[1])}")
        front = results.get("true_front")
        if front:
            arr = np.asarray(front, dtype=float)
            ax.plot(arr[:, 0], arr[:, 1], "k--", lw=1, label="Pareto front")
            ax.legend(fontsize=8)
        more = f" (first 2 of {len(tasks)} tasks)" if len(tasks) > 2 else ""
        ax.set_title(
            f"{a[0]} {_label(a[1])} vs {b[0]} {_label(b[1])} across {param}{more}\n"
            f"{what}, {phrase}; axes span the data",
            fontsize=10,
        )
    else:
        ax.text(0.5, 0.5, "a front needs two tasks", ha="center", va="center")
        ax.set_title(f"front across {param}")
    ax.grid(alpha=0.3)
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
    _drop_unused(fig, axes, len(bals))
    steps = results.get("config", {}).get("toy", {}).get("steps")
    fig.suptitle(f"2-D toy: trajectories ({steps} Adam steps; o start, * end) over (L1 + L2) / 2")
    fig.tight_layout()
    return _save(fig, path)


def _run_label(run: Mapping[str, Any], param: str | None) -> str:
    """``start (x1, x2)``, with the swept value in a sweep."""
    label = f"start {tuple(run['start'])}"
    return label if "value" not in run else f"{param}={run['value']}, {label}"
