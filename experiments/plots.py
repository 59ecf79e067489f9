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

The figures are built by private modules, one per idea: :mod:`experiments._plots_common` (the
conventions above: backend, layout, colours, styles, axis limits, labels),
:mod:`experiments._plots_metrics` (``metrics.png``), :mod:`experiments._plots_training`
(``weights.png``, ``curves.png``, ``trajectories.png``) and :mod:`experiments._plots_sweep`
(``sweep_metrics.png``, ``sweep_front.png``); this module saves them as PNG files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._plots_common import (  # noqa: F401  (re-exported)
    _DPI,
    _SEED_STYLES,
    AXIS_FLOOR,
    _arrow,
    _drop_unused,
    _fig_legend,
    _figure,
    _finite,
    _floor_note,
    _fmt,
    _grid,
    _label,
    _palette,
    _save,
    _seed_handles,
    _seed_styles,
    _seeds_phrase,
    _shared_limits,
)
from ._plots_metrics import (  # noqa: F401  (re-exported)
    _bars,
    _metrics_figure,
    _paired_differences,
    _tick_labels,
)
from ._plots_sweep import (  # noqa: F401  (re-exported)
    _sweep_counts,
    _sweep_data,
    _sweep_front_figure,
    _sweep_metrics_figure,
)
from ._plots_training import (  # noqa: F401  (re-exported)
    SHARE_RATIO,
    _curve_title,
    _curves_figure,
    _epoch_values,
    _run_label,
    _toy_trajectories_figure,
    _weights_figure,
)

__all__ = [
    "AXIS_FLOOR",
    "plot_compare_metrics",
    "plot_curves",
    "plot_sweep",
    "plot_toy_trajectories",
    "plot_weights",
]


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
    return _save(_metrics_figure(results, summary), path)


def plot_weights(results: Mapping[str, Any], path: Path) -> Path:
    """Task weights over training, one panel per balancer: one colour per task, one line style
    per seed.

    Every y axis includes 0 (a ±2 % jitter looks like one). The weight panels share one scale
    and the coefficient panels (GradOPS, PCGrad: projection coefficients, any sign) another,
    unless the panels' largest values differ by more than :data:`SHARE_RATIO` (e.g. MGDA's
    weights summing to 1 next to MultiBalance's of 50): then each of those panels has its own
    scale from 0, and the figure title says so.
    """
    return _save(_weights_figure(results), path)


def plot_curves(results: Mapping[str, Any], path: Path) -> Path:
    """Validation metrics per epoch, every epoch: one panel per metric kind (AUC of the binary
    tasks, MSE of the regression tasks), one colour per balancer, one line style per seed; each
    y axis spans all the values drawn."""
    return _save(_curves_figure(results), path)


def plot_sweep(results: Mapping[str, Any], metrics_path: Path, front_path: Path) -> list[Path]:
    """Each task metric against the swept parameter (one y scale per metric, spanning the
    data), and the first metric of the first task against that of the second as a front, both
    with ± std error bars only where n >= 2."""
    sweep = _sweep_data(results)
    out = [_save(_sweep_metrics_figure(results, sweep), metrics_path)]
    out.append(_save(_sweep_front_figure(results, sweep), front_path))
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
    fig = _toy_trajectories_figure(results, grid=grid, pareto=pareto, seed=seed)
    return _save(fig, path)
