"""The shared conventions of the figures in :mod:`experiments.plots`: the Agg backend and the
PNG writer, the panel grid and figure layout, the colours (one per balancer or task) and line
styles (one per seed) with their legend, the axis floors of the bars (:data:`AXIS_FLOOR`), y
limits shared by the panels of one metric, and the labels, value formats and "mean ± std over n
seeds" phrases every figure uses.
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

from . import report  # noqa: E402

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
