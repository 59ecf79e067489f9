"""The figures: ``bench_ratios.png`` (step-time ratio vs K per mode, sections rep and param) and
``bench_marigold.png`` (MARIGOLD's K-scaling, and its weights against the exact MGDA weights).

matplotlib is imported when the figures are drawn (``--no-plots`` never loads it), with the
``Agg`` backend selected first.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import ListedColormap

__all__ = ["make_plots"]

#: one marker per pass through the colour palette (tab20: 20 modes per marker)
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _ratio_axes(ax: Axes, sec: str, data: dict[str, Any], colors: Any) -> None:
    """One section's ratio vs K per mode, min-max as error bars (peers dashed); past the
    palette's colours the markers change, so that every mode stays distinguishable."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for r in data["results"]:
        if "ratio" in r and r.get("error") is None:
            by_mode.setdefault(r["mode"], []).append(r)
    for i, (mode, rs) in enumerate(by_mode.items()):
        rs = sorted(rs, key=lambda r: r["K"])
        ks = [r["K"] for r in rs]
        med = [r["ratio"] for r in rs]
        lo = [r["ratio"] - r["ratio_min"] for r in rs]
        hi = [r["ratio_max"] - r["ratio"] for r in rs]
        style = "--" if mode.startswith(("torchjd", "rechub")) else "-"
        ax.errorbar(
            ks,
            med,
            yerr=[lo, hi],
            color=colors[i % len(colors)],
            marker=_MARKERS[(i // len(colors)) % len(_MARKERS)],
            linestyle=style,
            capsize=3,
            label=mode,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(data["tasks"])
    ax.set_xticklabels([str(k) for k in data["tasks"]])
    if sec == "param":
        ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("K (tasks)")
    ax.set_ylabel("step time / plain step (median, min–max)")
    ax.set_title(f"{sec}: {data['title']} ({data['rows_per_table']} rows)")
    ax.legend(fontsize=7, ncol=2)


def _ratios_figure(plt: ModuleType, results: dict[str, Any], secs: list[str], out: Path) -> str:
    fig, axes = plt.subplots(1, len(secs), figsize=(7 * len(secs), 5), squeeze=False)
    colors = cast("ListedColormap", plt.get_cmap("tab20")).colors
    for ax, sec in zip(axes[0], secs):
        _ratio_axes(ax, sec, results["sections"][sec], colors)
    fig.tight_layout()
    path = out / "bench_ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _k_scaling_axes(ax: Axes, mk: list[dict[str, Any]]) -> None:
    for key, label in (
        ("marigold_sparse", "MARIGOLD param. (sparse tables)"),
        ("marigold_dense", "MARIGOLD param. (dense tables)"),
        ("mgda_dense", "MGDA param. (dense tables)"),
        ("marigold_rep_sparse", "MARIGOLD rep. (sparse tables)"),
    ):
        pts = [(r["K"], r[f"{key}_ratio"]) for r in mk if f"{key}_ratio" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(1.3, color="red", linewidth=0.8, linestyle=":", label="budget 1.3x")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (tasks)")
    ax.set_ylabel("step time / plain step")
    ax.set_title("MARIGOLD K-scaling")
    ax.legend(fontsize=8)


def _lambda_axes(ax: Axes, lam: list[dict[str, Any]]) -> None:
    for run in lam:
        recs = run.get("records") or []
        if recs:
            ax.plot(
                [r["step"] for r in recs],
                [r["l1"] for r in recs],
                marker="o",
                label=f"K={run['K']}: MARIGOLD λ",
            )
            ax.plot(
                [r["step"] for r in recs],
                [r["l1_uniform"] for r in recs],
                linestyle=":",
                label=f"K={run['K']}: uniform",
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("L1 distance to exact MGDA weights")
    ax.set_title("MARIGOLD λ vs exact MGDA (parameter level)")
    ax.legend(fontsize=8)


def _marigold_figure(
    plt: ModuleType, mk: list[dict[str, Any]], lam: list[dict[str, Any]], out: Path
) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    _k_scaling_axes(axes[0], mk)
    _lambda_axes(axes[1], lam)
    fig.tight_layout()
    path = out / "bench_marigold.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def make_plots(results: dict[str, Any], out: Path) -> list[str]:
    """``bench_ratios.png`` (ratio vs K per mode) and ``bench_marigold.png``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    files = []
    secs = [s for s in ("rep", "param") if s in results["sections"]]
    if secs:
        files.append(_ratios_figure(plt, results, secs, out))
    mk = results["derived"]["marigold_k"]
    lam = results.get("marigold_lambda", {}).get("runs", [])
    if mk or lam:
        files.append(_marigold_figure(plt, mk, lam, out))
    return files
