"""Matplotlib plots of task-conflict diagnostics and of the 2-D toy problem.

Every function takes an optional ``ax``; without one it creates a new figure with
``matplotlib.pyplot`` (so it displays in notebooks and with ``plt.show()``; under a headless
backend such as Agg nothing is shown). Every function returns the :class:`~matplotlib.figure.Figure`
(close it with ``plt.close(fig)`` when making many). Nothing is printed.

History plots accept a :class:`~mtl.conflict.ConflictTracker` or its ``history`` (a list of flat
records, e.g. read back with ``ConflictTracker.from_json``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from .conflict import ConflictTracker, cosine_matrix
from .conflict._dashboard import draw_cosine_matrix, window_matrix
from .conflict._records import rolling_nanmean

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_conflict_over_training",
    "plot_cosine_heatmap",
    "plot_gradient_norms",
    "plot_toy_trajectories",
    "plot_weights_over_training",
    "plot_window_cosine_heatmap",
]

History = ConflictTracker | Sequence[Mapping[str, Any]]
SourceChoice = Literal["balance", "probe", "all"]
RateChoice = Literal["rolling", "step", "both"]
DEFAULT_WINDOW = 50
"""The rolling window (sampled steps) of a plain list of records (a tracker has its own)."""


# ---------------------------------------------------------------------- helpers
def _axes(ax: Axes | None, figsize: tuple[float, float] = (6.4, 4.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure.figure, ax  # the root figure, also for subfigures
    import matplotlib.pyplot as plt

    fig, new_ax = plt.subplots(figsize=figsize)
    return fig, new_ax


def _records(history: History) -> list[Mapping[str, Any]]:
    if isinstance(history, ConflictTracker):
        return list(history.history)
    if isinstance(history, Mapping):
        raise TypeError("history must be a ConflictTracker or a list of records, not one record")
    recs = list(history)
    for r in recs:
        if not isinstance(r, Mapping) or "step" not in r:
            raise TypeError("history records must be mappings with a 'step' key")
    return recs


def _task_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task names of the records' ``norm[...]`` keys (every tracker record has them), else
    of their ``weight[...]`` or ``loss[...]`` keys (hand-made records)."""
    if not records:
        return []
    for prefix in ("norm[", "weight[", "loss["):
        names = [
            k[len(prefix) : -1] for k in records[0] if k.startswith(prefix) and k.endswith("]")
        ]
        if names:
            return names
    return []


def _sources(records: Sequence[Mapping[str, Any]], source: SourceChoice) -> list[str]:
    if source not in ("balance", "probe", "all"):
        raise ValueError(f"source must be 'balance', 'probe' or 'all', got {source!r}")
    present = [s for s in ("balance", "probe") if any(r.get("source") == s for r in records)]
    return present if source == "all" else [s for s in present if s == source]


def _series(
    records: Sequence[Mapping[str, Any]], key: str, source: str
) -> tuple[np.ndarray, np.ndarray]:
    rs = [r for r in records if r.get("source", "balance") == source]
    steps = np.array([r["step"] for r in rs], dtype=np.float64)
    vals = np.array([float(r.get(key, np.nan)) for r in rs], dtype=np.float64)
    return steps, vals


def _task_color(i: int, k: int) -> Any:
    """The colour of task ``i`` of ``k``: the default cycle ``C0``-``C9`` up to 10 tasks, the
    20 colours of ``tab20`` up to 20 (so that K = 16 tasks keep 16 distinct colours), then
    ``tab20`` again."""
    if k <= 10:
        return f"C{i % 10}"
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)


_STYLE = {"balance": "-", "probe": "--"}
_SUFFIX = {"balance": "", "probe": " (parameters)"}


def _window(history: History, window: int | None) -> int:
    """``window``, else the tracker's ``window``, else :data:`DEFAULT_WINDOW`."""
    w = getattr(history, "window", DEFAULT_WINDOW) if window is None else window
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    return int(w)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _finish(ax: Axes, title: str | None, ylabel: str, any_line: bool) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if any_line:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


# ---------------------------------------------------------------------- conflict plots
def plot_cosine_heatmap(
    matrix: Tensor | np.ndarray | Sequence[Sequence[float]],
    task_names: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    annotate: bool = True,
    cmap: str = "RdBu_r",
    title: str | None = "Task-gradient cosine",
) -> Figure:
    """Heatmap of the pairwise cosines of the task gradients, on a fixed ``[-1, 1]`` scale.

    Args:
        matrix: a ``(K, K)`` Gram matrix or cosine matrix (:func:`mtl.conflict.cosine_matrix`
            is applied; it leaves a cosine matrix unchanged).
        task_names: axis labels (default ``0 .. K-1``).
        ax: axes to draw on (default: a new figure).
        annotate: write the values in the cells.
        cmap: a diverging colormap (red = aligned, blue = conflicting by default).
        title: axes title (``None`` for none).
    """
    cos = cosine_matrix(torch.as_tensor(_to_numpy(matrix))).numpy()
    k = cos.shape[0]
    names = [str(i) for i in range(k)] if task_names is None else [str(n) for n in task_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} task names for a {k} x {k} matrix")
    fig, ax = _axes(ax, figsize=(1.2 + 0.9 * k, 0.8 + 0.8 * k))
    im = ax.imshow(cos, cmap=cmap, vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=names)
    if annotate:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{cos[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if abs(cos[i, j]) > 0.6 else "black",
                    fontsize="small",
                )
    ax.figure.colorbar(im, ax=ax, label="cosine")
    if title:
        ax.set_title(title)
    return fig


def plot_window_cosine_heatmap(
    history: History,
    *,
    window: int | None = None,
    source: Literal["balance", "probe"] = "balance",
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heatmap of the **window-averaged** cosine matrix: the mean of the cosine matrices of the
    last ``window`` sampled steps of ``source``
    (:meth:`~mtl.conflict.ConflictTracker.window_cosine_matrix`), on a fixed ``[-1, 1]`` scale.

    One step's matrix is noise around the mean; the window mean is what the tracker summarises.
    The matrix is drawn as it is (its diagonal is the share of steps where the task's gradient was
    non-zero), not renormalised as :func:`plot_cosine_heatmap` does.

    Args:
        history: a :class:`~mtl.conflict.ConflictTracker` or its ``history``.
        window: sampled steps averaged (default: the tracker's ``window``; 50 for records).
        source: ``"balance"`` (default; the balance point) or ``"probe"`` (parameter level).
        ax: axes to draw on (default: a new figure).
        title: axes title; default ``"Cosine: mean of the last n sampled steps"`` (``"Cosine
            (parameters): mean of the last n probes"``) with the number of steps that had a Gram
            matrix.
    """
    if source not in ("balance", "probe"):
        raise ValueError(f"source must be 'balance' or 'probe', got {source!r}")
    w = _window(history, window)
    recs = _records(history)
    names = list(getattr(history, "task_names", None) or _task_names(recs))
    matrix, n_ok = window_matrix(recs, names, source, w)
    k = len(names)
    fig, ax = _axes(ax, figsize=(1.6 + 0.9 * max(k, 2), 1.0 + 0.8 * max(k, 2)))
    if title is None:
        title = (
            f"Cosine (parameters): mean of the last {n_ok} probes"
            if source == "probe"
            else f"Cosine: mean of the last {n_ok} sampled steps"
        )
    if k == 0:  # no task names yet: nothing to draw
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return fig
    draw_cosine_matrix(ax, matrix, names, title)
    return fig


def plot_conflict_over_training(
    history: History,
    *,
    ax: Axes | None = None,
    source: SourceChoice = "all",
    show_pairs: bool = True,
    show_rate: bool = True,
    max_pair_labels: int = 6,
    title: str | None = "Gradient conflict",
    rate: RateChoice = "rolling",
    window: int | None = None,
) -> Figure:
    """Pairwise cosines ``cos[a,b]`` and the conflict rate over training.

    Balance-point records are drawn solid, parameter-level probes dashed. The conflict rate (share
    of pairs with negative cosine) is drawn in black on the same ``[-1, 1]`` axis; a zero line
    marks the conflict threshold. By default the rate is the **rolling** mean over the last
    ``window`` sampled steps (:meth:`~mtl.conflict.ConflictTracker.rolling_conflict_rate`): with
    two tasks the per-step rate is 0 or 1 at every step, a barcode that says little.

    Args:
        history: a :class:`~mtl.conflict.ConflictTracker` or its ``history``.
        ax: axes to draw on (default: a new figure).
        source: ``"balance"``, ``"probe"`` or ``"all"`` (default).
        show_pairs: draw one line per task pair.
        max_pair_labels: with more pairs than this, the pair lines are drawn thin and
            translucent in one colour under a single legend entry.
        show_rate: draw the conflict rate.
        title: axes title.
        rate: ``"rolling"`` (default): the mean rate of the last ``window`` sampled steps;
            ``"step"``: the rate of each step; ``"both"``: the rolling rate over faint dots of the
            per-step rate.
        window: sampled steps per rolling mean (default: the tracker's ``window``; 50 for a list
            of records).
    """
    if rate not in ("rolling", "step", "both"):
        raise ValueError(f"rate must be 'rolling', 'step' or 'both', got {rate!r}")
    w = _window(history, window)
    recs = _records(history)
    names = _task_names(recs)
    fig, ax = _axes(ax)
    ax.axhline(0.0, color="0.6", lw=0.8)
    any_line = False
    colors = [f"C{i}" for i in range(10)]
    for src in _sources(recs, source):
        ls, sfx = _STYLE[src], _SUFFIX[src]
        if show_pairs:
            pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
            many = len(pairs) > max_pair_labels
            for p, (a, b) in enumerate(pairs):
                x, y = _series(recs, f"cos[{a},{b}]", src)
                if many:  # one legend entry for all pairs
                    label = f"pairwise cosines{sfx}" if p == 0 else None
                    ax.plot(x, y, ls, color="tab:blue", alpha=0.35, lw=0.8, label=label)
                else:
                    label = f"cos({a}, {b}){sfx}"
                    ax.plot(x, y, ls, color=colors[p % 10], label=label, lw=1.2)
                any_line = True
        if show_rate:
            x, y = _series(recs, "conflict_rate", src)
            if rate in ("step", "both"):
                fmt, lw, alpha = (ls, 1.6, 1.0) if rate == "step" else (".", 0.0, 0.35)
                ax.plot(x, y, fmt, color="black", lw=lw, alpha=alpha, ms=3,
                        label=f"conflict rate per step{sfx}")  # fmt: skip
            if rate in ("rolling", "both"):
                unit = "probes" if src == "probe" else "sampled steps"
                label = f"conflict rate, mean of last {w} {unit}{sfx}"
                ax.plot(x, rolling_nanmean(y, w), ls, color="black", label=label, lw=1.8)
            any_line = True
    ax.set_ylim(-1.05, 1.05)
    _finish(ax, title, "cosine / conflict rate", any_line)
    return fig


def plot_weights_over_training(
    history: History,
    *,
    ax: Axes | None = None,
    title: str | None = "Task weights",
    include_zero: bool = True,
) -> Figure:
    """The coefficients ``weight[name]`` applied to each task's gradient, over training.

    Taken from the balance-point records (per-block weights appear as their mean over blocks),
    one line per task labelled with its name. Every balancer's weights are
    ``BalanceInfo.weights``, whatever their origin: a min-norm solution (MGDA), a rule of the
    gradient norms (MultiBalance), or learned state (UW's ``1/(2 sigma_k^2)``, GradNorm's ``w_k``,
    FAMO's ``c_k``...); loss-level methods have no Gram matrix (records ``status="no_gram"``)
    but their weights are plotted all the same. Records of skipped steps have none (gaps).

    With ``include_zero`` (default) the y axis includes 0, so that a jitter of a few percent
    around a weight of 1 looks like one (matplotlib would zoom in on it).
    """
    recs = _records(history)
    names = _task_names(recs)
    fig, ax = _axes(ax)
    any_line = False
    for i, n in enumerate(names):
        x, y = _series(recs, f"weight[{n}]", "balance")
        if x.size and not np.isnan(y).all():
            ax.plot(x, y, "-", color=_task_color(i, len(names)), label=n)
            any_line = True
    if any_line and include_zero:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.0), max(hi, 0.0))
    _finish(ax, title, "weight", any_line)
    return fig


def plot_gradient_norms(
    history: History,
    *,
    ax: Axes | None = None,
    source: SourceChoice = "balance",
    log: bool | None = None,
    title: str | None = "Task-gradient norms",
) -> Figure:
    """Per-task gradient norms ``norm[name]`` over training.

    Args:
        history: a :class:`~mtl.conflict.ConflictTracker` or its ``history``.
        ax: axes to draw on.
        source: ``"balance"`` (default; norms at the balance point), ``"probe"`` (parameter level)
            or ``"all"`` (both; their scales differ, dashed = parameters).
        log: logarithmic y axis; default: when every plotted norm is positive.
        title: axes title.
    """
    recs = _records(history)
    names = _task_names(recs)
    fig, ax = _axes(ax)
    any_line = False
    positive = True
    for src in _sources(recs, source):
        for i, n in enumerate(names):
            x, y = _series(recs, f"norm[{n}]", src)
            if not x.size:
                continue
            finite = y[np.isfinite(y)]
            positive = positive and bool((finite > 0).all())
            ax.plot(x, y, _STYLE[src], color=_task_color(i, len(names)), label=f"{n}{_SUFFIX[src]}")
            any_line = True
    if (log is None and any_line and positive) or log:
        ax.set_yscale("log")
    _finish(ax, title, "gradient norm", any_line)
    return fig


# ---------------------------------------------------------------------- toy problem
LossGrid = tuple[Any, Any, Any]
ContourData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _split_losses(out: Any, shape: tuple[int, ...], what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(L1, L2)`` of ``shape`` from a pair of arrays or one ``(*shape, 2)`` array; ``what``
    names the losses in errors (``"loss_fn must return"``)."""
    if isinstance(out, (tuple, list)) and len(out) == 2:
        l1, l2 = _to_numpy(out[0]), _to_numpy(out[1])
    else:
        arr = _to_numpy(out)
        if arr.shape != (*shape, 2):
            raise ValueError(
                f"{what} shape {(*shape, 2)} (or a pair of {shape} arrays) on a grid of shape "
                f"{shape}, got {arr.shape}"
            )
        l1, l2 = arr[..., 0], arr[..., 1]
    if l1.shape != shape or l2.shape != shape:
        raise ValueError(f"{what} losses of shape {shape}, got shapes {l1.shape}, {l2.shape}")
    return l1, l2


def _contour_data(
    loss_fn: Callable[[Any], Any] | None,
    loss_grid: LossGrid | None,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    grid: int,
) -> ContourData | None:
    """``(X1, X2, L1, L2)`` on the contour grid: ``loss_fn`` evaluated on an ``xlim`` x ``ylim``
    grid, or the precomputed ``loss_grid``; ``None`` without either."""
    if loss_fn is not None and loss_grid is not None:
        raise ValueError("pass loss_fn or loss_grid, not both")
    if loss_grid is not None:
        x1, x2 = _to_numpy(loss_grid[0]), _to_numpy(loss_grid[1])
        if x1.ndim != 2 or x2.shape != x1.shape:
            raise ValueError(
                f"loss_grid needs X1 and X2 of one 2-D shape, got {x1.shape} and {x2.shape}"
            )
        return (x1, x2, *_split_losses(loss_grid[2], x1.shape, "loss_grid needs"))
    if loss_fn is None:
        return None
    x1, x2 = np.meshgrid(
        np.linspace(xlim[0], xlim[1], int(grid)), np.linspace(ylim[0], ylim[1], int(grid))
    )
    with torch.no_grad():
        out = loss_fn(torch.from_numpy(np.stack([x1, x2], axis=-1)))
    return (x1, x2, *_split_losses(out, x1.shape, "loss_fn must return"))


def _draw_contours(
    ax: Axes, data: ContourData, contour: Literal["mean", "both"], levels: int
) -> None:
    x1, x2, l1, l2 = data
    if contour == "mean":
        cs = ax.contourf(x1, x2, 0.5 * (l1 + l2), levels=levels, cmap="viridis", alpha=0.75)
        ax.figure.colorbar(cs, ax=ax, label="(L1 + L2) / 2")
        return
    ax.contour(x1, x2, l1, levels=levels, colors="tab:blue", linewidths=0.6, alpha=0.7)
    ax.contour(
        x1, x2, l2, levels=levels, colors="tab:red", linewidths=0.6, linestyles="dashed", alpha=0.7
    )


def _draw_trajectories(ax: Axes, trajectories: Mapping[str, Sequence[Any] | Any]) -> None:
    for m, (method, trajs) in enumerate(trajectories.items()):
        items = [trajs] if isinstance(trajs, (np.ndarray, Tensor)) else list(trajs)
        color = f"C{m % 10}"
        for t, traj in enumerate(items):
            a = _to_numpy(traj)
            if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] == 0:
                raise ValueError(
                    f"trajectory {t} of {method!r} must have shape (T, 2), got {a.shape}"
                )
            ax.plot(a[:, 0], a[:, 1], "-", color=color, lw=1.5, label=method if t == 0 else None)
            ax.plot(a[0, 0], a[0, 1], "o", color=color, ms=5)
            ax.plot(a[-1, 0], a[-1, 1], "*", color=color, ms=11, markeredgecolor="black")


def plot_toy_trajectories(
    trajectories: Mapping[str, Sequence[Any] | Any],
    loss_fn: Callable[[Any], Any] | None = None,
    pareto: Any | None = None,
    *,
    ax: Axes | None = None,
    xlim: tuple[float, float] = (-10.0, 10.0),
    ylim: tuple[float, float] = (-10.0, 10.0),
    grid: int = 200,
    contour: Literal["mean", "both"] = "mean",
    levels: int = 20,
    title: str | None = None,
    loss_grid: LossGrid | None = None,
    legend: bool = True,
) -> Figure:
    """Optimisation trajectories on a 2-D two-objective problem, over its loss contours.

    Args:
        trajectories: ``{method: [traj, ...]}`` with each ``traj`` a ``(T, 2)`` array or tensor
            of points ``(x1, x2)`` (a single ``(T, 2)`` array per method is accepted too). One
            colour per method; a circle marks each start, a star each end.
        loss_fn: optional callable evaluated once on the grid: it receives a float64 tensor of
            shape ``(n, n, 2)`` and returns the two losses as ``(n, n, 2)`` (tensor or array) or
            a pair of ``(n, n)``, e.g. ``tasks.toy.toy_losses``. ``None``: no contours.
        pareto: optional ``(P, 2)`` points of the Pareto set in ``x`` space (e.g.
            ``tasks.toy.pareto_front()``), drawn as a thick grey line.
        ax: axes to draw on.
        xlim, ylim: the plotted region (also the contour grid of ``loss_fn``).
        grid: contour grid resolution per axis (for ``loss_fn``).
        contour: ``"mean"`` (default): filled contours of ``(L1 + L2) / 2``; ``"both"``: line
            contours of ``L1`` (solid) and ``L2`` (dashed).
        levels: number of contour levels.
        title: axes title.
        loss_grid: instead of ``loss_fn``, precomputed contour data ``(X1, X2, L)`` with
            ``X1, X2`` of shape ``(n, m)`` and ``L`` of shape ``(n, m, 2)`` (or a pair of
            ``(n, m)``), e.g. ``tasks.toy.loss_grid(...)``.
        legend: draw the legend (default True; e.g. only on one panel of a figure).
    """
    if contour not in ("mean", "both"):
        raise ValueError(f"contour must be 'mean' or 'both', got {contour!r}")
    fig, ax = _axes(ax, figsize=(6.0, 5.0))
    data = _contour_data(loss_fn, loss_grid, xlim, ylim, grid)
    if data is not None:
        _draw_contours(ax, data, contour, levels)
    if pareto is not None:
        p = _to_numpy(pareto)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"pareto must have shape (P, 2), got {p.shape}")
        ax.plot(p[:, 0], p[:, 1], "-", color="0.4", lw=5, alpha=0.6, label="Pareto set")
    _draw_trajectories(ax, trajectories)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    if title:
        ax.set_title(title)
    if legend and (trajectories or pareto is not None):
        ax.legend(fontsize="small", loc="best")
    return fig
