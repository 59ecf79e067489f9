"""The tracker's four-panel dashboard: window-averaged cosine heatmap, conflict (pairwise
cosines and the rolling conflict rate), task weights, gradient norms.

matplotlib and :mod:`mtl.plotting` are imported when a figure is drawn (``mtl.plotting`` imports
this package)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._records import rolling_nanmean, window_cosine

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._tracker import ConflictTracker

__all__ = ["plot_dashboard"]

DashboardSource = Literal["balance", "probe", "all"]


def draw_cosine_matrix(
    ax: Axes, matrix: np.ndarray, task_names: Sequence[str], title: str | None
) -> None:
    """A cosine matrix (already in ``[-1, 1]``, NaN = no data) as a heatmap on ``ax``.

    Unlike :func:`mtl.plotting.plot_cosine_heatmap` the matrix is drawn as given: a window mean
    of cosine matrices has diagonal entries below 1 when a task had zero gradients in the
    window, and normalising it again would change every value.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    names = [str(n) for n in task_names]
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=names)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                text = "-" if np.isnan(v) else f"{v:.2f}"
                color = "white" if abs(v) > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    ax.figure.colorbar(im, ax=ax, label="cosine")
    if title:
        ax.set_title(title)
    if k == 0 or np.isnan(m).all():
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def cosine_heatmap_figure(matrix: np.ndarray, task_names: Sequence[str], title: str) -> Figure:
    """A standalone (non-pyplot) figure of :func:`draw_cosine_matrix`, e.g. for TensorBoard."""
    from matplotlib.figure import Figure

    k = int(np.asarray(matrix).shape[0])
    fig = Figure(figsize=(1.6 + 0.9 * k, 1.0 + 0.8 * k))
    draw_cosine_matrix(fig.add_subplot(), matrix, task_names, title)
    fig.tight_layout()
    return fig


def _records_of(history: ConflictTracker | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    from ._tracker import ConflictTracker

    if isinstance(history, ConflictTracker):
        return list(history.history)
    if isinstance(history, Mapping):
        raise TypeError("history must be a ConflictTracker or a list of records, not one record")
    return list(history)


def _names_of(
    history: ConflictTracker | Sequence[Mapping[str, Any]], recs: Sequence[Mapping[str, Any]]
) -> list[str]:
    names = getattr(history, "task_names", None)
    if names:
        return list(names)
    if not recs:
        return []
    return [k[5:-1] for k in recs[0] if k.startswith("norm[") and k.endswith("]")]


def rolling_rate_series(
    recs: Sequence[Mapping[str, Any]], source: str, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, rolling conflict rate)`` over the records of ``source``."""
    rs = [r for r in recs if r.get("source", "balance") == source]
    steps = np.array([r["step"] for r in rs], dtype=np.int64)
    rates = np.array([float(r.get("conflict_rate", np.nan)) for r in rs], dtype=np.float64)
    return steps, rolling_nanmean(rates, window)


def window_matrix(
    recs: Sequence[Mapping[str, Any]], names: Sequence[str], source: str, window: int
) -> tuple[np.ndarray, int]:
    """``(mean cosine matrix of the last `window` records of source, records with a Gram)``."""
    rs = [r for r in recs if r.get("source", "balance") == source][-window:]
    return window_cosine(rs, names), sum(r.get("status") == "ok" for r in rs)


def plot_dashboard(
    history: ConflictTracker | Sequence[Mapping[str, Any]],
    *,
    window: int | None = None,
    source: DashboardSource = "balance",
    fig: Figure | None = None,
) -> Figure:
    """Four panels: the window-averaged cosine heatmap, conflict, task weights, gradient norms.

    * top left: the mean of the cosine matrices of the last ``window`` sampled steps
      (:meth:`ConflictTracker.window_cosine_matrix`), titled with the number of steps averaged;
    * top right: the pairwise cosines and the **rolling** conflict rate (the mean over the last
      ``window`` sampled steps; with two tasks the per-step rate is a 0/1 barcode);
    * bottom: :func:`mtl.plotting.plot_weights_over_training` and
      :func:`mtl.plotting.plot_gradient_norms`.

    Args:
        history: a :class:`~mtl.conflict.ConflictTracker` or its ``history``.
        window: sampled steps per window (default: the tracker's ``window``, else 50).
        source: ``"balance"`` (default), ``"probe"`` (parameter-level probes: heatmap and
            conflict) or ``"all"`` (conflict and norms of both; heatmap of the balance records).
        fig: the figure to draw on (default: a new pyplot figure, shown in notebooks).

    Returns:
        the figure (``fig.savefig("dashboard.png")``; close it with ``plt.close(fig)``).
    """
    from mtl.plotting import (
        plot_conflict_over_training,
        plot_gradient_norms,
        plot_weights_over_training,
    )

    if source not in ("balance", "probe", "all"):
        raise ValueError(f"source must be 'balance', 'probe' or 'all', got {source!r}")
    w = int(getattr(history, "window", 50) if window is None else window)
    if w < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    recs = _records_of(history)
    names = _names_of(history, recs)
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(13.0, 9.5), layout="constrained")
    axes = fig.subplots(2, 2)

    heat_src = "probe" if source == "probe" else "balance"
    matrix, n_ok = window_matrix(recs, names, heat_src, w)
    where = " (parameters)" if heat_src == "probe" else ""
    draw_cosine_matrix(
        axes[0, 0], matrix, names, f"Cosine{where}: mean of the last {n_ok} sampled steps"
    )

    ax = axes[0, 1]
    srcs = ["balance", "probe"] if source == "all" else [source]
    plot_conflict_over_training(
        recs, ax=ax, source=source, show_rate=False, title=f"Gradient conflict (window {w})"
    )
    drawn = False
    for src in srcs:
        steps, rolling = rolling_rate_series(recs, src, w)
        if steps.size and not np.isnan(rolling).all():
            ls, sfx = ("--", " (parameters)") if src == "probe" else ("-", "")
            label = f"conflict rate, mean of last {w}{sfx}"
            ax.plot(steps, rolling, ls, color="black", lw=2.0, label=label)
            drawn = True
    if drawn:
        for t in list(ax.texts):  # the "no data" note of a panel without pair lines
            t.remove()
        ax.legend(fontsize="small", loc="best")
    ax.set_ylabel("cosine / conflict rate")

    plot_weights_over_training(recs, ax=axes[1, 0])
    plot_gradient_norms(recs, ax=axes[1, 1], source=source)
    return fig
