"""Tests for mtl.plotting: every function returns a Figure and saves a PNG (Agg backend)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mtl import BalanceInfo  # noqa: E402
from mtl.conflict import ConflictTracker  # noqa: E402
from mtl.plotting import (  # noqa: E402
    plot_conflict_over_training,
    plot_cosine_heatmap,
    plot_gradient_norms,
    plot_toy_trajectories,
    plot_weights_over_training,
    plot_window_cosine_heatmap,
)

D64 = torch.float64


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def _saved(fig: Figure, path: Path) -> None:
    assert isinstance(fig, Figure)
    fig.savefig(path)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tracker(with_probes: bool = True) -> ConflictTracker:
    tr = ConflictTracker(every=2, param_level_every=4, task_names=["ctr", "cvr", "watch"])
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        g = torch.randn(3, 6, generator=gen, dtype=D64)
        w = torch.softmax(torch.randn(3, generator=gen, dtype=D64), 0)
        info = BalanceInfo(
            weights=w, losses=torch.rand(3, dtype=D64), gram=g @ g.T, level="representation"
        )
        if with_probes:
            # parameter-level probe on a linear "model": the task gradients are the rows of a
            theta = torch.zeros(10, dtype=D64, requires_grad=True)
            a = torch.randn(3, 10, generator=gen, dtype=D64)
            tr.update_parameter_level(step, [(theta * a[k]).sum() for k in range(3)], [theta])
        tr.update(step, info)
    return tr


def test_cosine_heatmap_from_gram_and_cosine(tmp_path: Path) -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]], dtype=D64)
    fig = plot_cosine_heatmap(g @ g.T, ["a", "b", "zero"])
    _saved(fig, tmp_path / "heat.png")
    fig2 = plot_cosine_heatmap(np.array([[1.0, -0.5], [-0.5, 1.0]]), annotate=False, title=None)
    _saved(fig2, tmp_path / "heat2.png")
    with pytest.raises(ValueError, match="task names"):
        plot_cosine_heatmap(g @ g.T, ["a"])


def test_history_plots_from_tracker_and_records(tmp_path: Path) -> None:
    tr = _tracker()
    _saved(plot_conflict_over_training(tr), tmp_path / "conflict.png")
    _saved(plot_conflict_over_training(tr.history, source="balance"), tmp_path / "c2.png")
    _saved(plot_weights_over_training(tr), tmp_path / "weights.png")
    _saved(plot_gradient_norms(tr.history), tmp_path / "norms.png")
    _saved(plot_gradient_norms(tr, source="all", log=False), tmp_path / "norms_all.png")


def test_history_plots_after_json_round_trip_with_missing_values(tmp_path: Path) -> None:
    tr = _tracker(with_probes=False)
    info = BalanceInfo(
        weights=torch.ones(3, dtype=D64),
        losses=torch.ones(3, dtype=D64),
        gram=None,
        level="representation",
    )
    with pytest.warns(RuntimeWarning):
        tr.update(20, info)  # a NaN record
    tr.to_json(tmp_path / "h.json")
    back = ConflictTracker.from_json(tmp_path / "h.json")
    assert math.isnan(back.history[-1]["conflict_rate"])
    _saved(plot_conflict_over_training(back.history), tmp_path / "c.png")
    _saved(plot_gradient_norms(back), tmp_path / "n.png")


def test_plots_on_given_axes_and_empty_history(tmp_path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    tr = _tracker()
    assert plot_conflict_over_training(tr, ax=axes[0]) is fig
    assert plot_weights_over_training(tr, ax=axes[1]) is fig
    assert plot_gradient_norms(tr, ax=axes[2]) is fig
    _saved(fig, tmp_path / "grid.png")
    _saved(plot_conflict_over_training([]), tmp_path / "empty.png")
    _saved(plot_weights_over_training(ConflictTracker()), tmp_path / "empty2.png")
    with pytest.raises(TypeError):
        plot_conflict_over_training({"step": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source"):
        plot_gradient_norms(tr, source="nope")  # type: ignore[arg-type]


def test_conflict_plot_with_many_pairs(tmp_path: Path) -> None:
    names = [f"t{i}" for i in range(6)]  # 15 pairs: one legend entry for all of them
    tr = ConflictTracker(every=1, task_names=names)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        g = torch.randn(6, 4, generator=gen, dtype=D64)
        info = BalanceInfo(
            weights=torch.ones(6, dtype=D64),
            losses=torch.ones(6, dtype=D64),
            gram=g @ g.T,
            level="representation",
        )
        tr.update(step, info)
    fig = plot_conflict_over_training(tr)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["pairwise cosines", "conflict rate, mean of last 50 sampled steps"]
    _saved(fig, tmp_path / "many.png")


def _two_losses(x: torch.Tensor) -> torch.Tensor:
    """A smooth 2-D two-objective function: distances to (-3, 0) and (3, 0)."""
    a = ((x - torch.tensor([-3.0, 0.0], dtype=x.dtype)) ** 2).sum(-1)
    b = ((x - torch.tensor([3.0, 0.0], dtype=x.dtype)) ** 2).sum(-1)
    return torch.stack([a, b], dim=-1)


def test_toy_trajectories(tmp_path: Path) -> None:
    t = np.linspace(0, 1, 50)[:, None]
    trajs: dict[str, Any] = {
        "MGDA": [np.hstack([-8 + 8 * t, 6 - 6 * t]), np.hstack([7 - 5 * t, -7 + 7 * t])],
        "EqualWeight": torch.from_numpy(np.hstack([5 - 5 * t, 5 - 5 * t])),
    }
    pareto = np.stack([np.linspace(-3, 3, 20), np.zeros(20)], axis=1)
    fig = plot_toy_trajectories(trajs, _two_losses, pareto, grid=60)
    _saved(fig, tmp_path / "toy.png")

    def pair(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = _two_losses(x).numpy()
        return out[..., 0], out[..., 1]

    fig2 = plot_toy_trajectories(trajs, pair, contour="both", grid=40, title="toy")
    _saved(fig2, tmp_path / "toy2.png")
    _saved(plot_toy_trajectories(trajs), tmp_path / "toy3.png")  # no contours
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        plot_toy_trajectories({"bad": [np.zeros((5, 3))]})
    with pytest.raises(ValueError, match="must return"):
        plot_toy_trajectories(trajs, lambda x: x.sum(-1), grid=10)


def test_toy_trajectories_with_toy_module(tmp_path: Path) -> None:
    toy = pytest.importorskip("tasks.toy")
    trajs = {"start": [np.array([[-8.5, 7.5], [-6.0, 2.0], [-2.0, -8.0]])]}
    fig = plot_toy_trajectories(trajs, toy.toy_losses, toy.pareto_front(30), grid=50)
    _saved(fig, tmp_path / "toy_real.png")


def test_toy_trajectories_on_a_precomputed_loss_grid(tmp_path: Path) -> None:
    toy = pytest.importorskip("tasks.toy")
    trajs = {"start": [np.array([[-8.5, 7.5], [-6.0, 2.0], [-2.0, -8.0]])]}
    grid = toy.loss_grid((-10.0, 10.0), 40, toy.TOY_SCALES)
    fig = plot_toy_trajectories(trajs, pareto=toy.pareto_front(30), loss_grid=grid, legend=False)
    assert fig.axes[0].get_legend() is None
    _saved(fig, tmp_path / "toy_grid.png")
    pair = (grid[0], grid[1], (grid[2][..., 0], grid[2][..., 1]))
    _saved(plot_toy_trajectories(trajs, loss_grid=pair, contour="both"), tmp_path / "toy_pair.png")
    with pytest.raises(ValueError, match="not both"):
        plot_toy_trajectories(trajs, toy.toy_losses, loss_grid=grid)
    with pytest.raises(ValueError, match="loss_grid needs"):
        plot_toy_trajectories(trajs, loss_grid=(grid[0], grid[1], grid[2][..., 0]))


def test_weights_plot_of_loss_level_records_with_many_tasks(tmp_path: Path) -> None:
    """Loss-level methods record weights without a Gram matrix (``no_gram``): the weight plot
    draws them, one line per task labelled with its name; 16 tasks keep 16 distinct colours
    (weights and norms), and hand-made records without ``norm[...]`` keys still plot."""
    from matplotlib.colors import to_rgba

    names = [f"task{i:02d}" for i in range(16)]
    tr = ConflictTracker(every=1, task_names=names)
    gen = torch.Generator().manual_seed(2)
    learned = []
    for step in range(6):
        w = 0.5 + torch.rand(16, generator=gen, dtype=D64)  # e.g. UW's 1 / (2 sigma^2)
        learned.append(w)
        info = BalanceInfo(
            weights=w, losses=torch.rand(16, dtype=D64), gram=None, level="representation"
        )
        with pytest.warns(RuntimeWarning) if step == 0 else contextlib.nullcontext():
            tr.update(step, info)
    fig = plot_weights_over_training(tr)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == names
    ys = np.asarray(lines[3].get_ydata(), dtype=np.float64)
    np.testing.assert_allclose(ys, np.array([float(w[3]) for w in learned]))
    assert len({to_rgba(ln.get_color()) for ln in lines}) == 16
    legend = ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == names
    _saved(fig, tmp_path / "weights16.png")
    g = torch.randn(16, 4, generator=gen, dtype=D64)
    tr.update(6, BalanceInfo(torch.ones(16), torch.ones(16), g @ g.T, "representation"))
    norms = plot_gradient_norms(tr).axes[0].get_lines()
    assert len({to_rgba(ln.get_color()) for ln in norms}) == 16
    hand = [{"step": s, "weight[a]": 0.3 + s, "weight[b]": 0.7} for s in range(3)]
    assert [ln.get_label() for ln in plot_weights_over_training(hand).axes[0].get_lines()] == [
        "a",
        "b",
    ]


# ---------------------------------------------------------------------------- issue 19 item 6
def _two_task_tracker(window: int = 4) -> ConflictTracker:
    """Two tasks whose cosine flips sign from step to step: a 0/1 per-step conflict rate."""
    tr = ConflictTracker(every=1, param_level_every=3, task_names=["a", "b"], window=window)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        g = torch.randn(2, 5, generator=gen, dtype=D64)
        theta = torch.zeros(5, dtype=D64, requires_grad=True)
        tr.update_parameter_level(step, [(theta * g[k]).sum() for k in range(2)], [theta])
        info = BalanceInfo(torch.ones(2, dtype=D64), torch.ones(2, dtype=D64), g @ g.T, "x")
        tr.update(step, info)
    return tr


def _line(fig: Figure, label_start: str) -> Any:
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith(label_start)]
    assert len(lines) == 1, [ln.get_label() for ln in fig.axes[0].get_lines()]
    return lines[0]


def test_conflict_rate_is_the_rolling_mean_by_default(tmp_path: Path) -> None:
    """With two tasks the per-step rate is a 0/1 barcode: the plot draws the tracker's rolling
    mean (its window, or ``window=``), the per-step rate only on request."""
    tr = _two_task_tracker(window=4)
    steps, raw = tr.series("conflict_rate")
    assert set(np.unique(raw)) == {0.0, 1.0}  # the barcode
    fig = plot_conflict_over_training(tr, source="balance")
    line = _line(fig, "conflict rate, mean of last 4 sampled steps")
    np.testing.assert_allclose(line.get_ydata(), tr.rolling_conflict_rate()[1])
    np.testing.assert_allclose(line.get_xdata(), steps)
    _saved(fig, tmp_path / "rolling.png")
    fig = plot_conflict_over_training(tr.history, source="balance", window=3)
    np.testing.assert_allclose(
        _line(fig, "conflict rate, mean of last 3").get_ydata(), tr.rolling_conflict_rate(3)[1]
    )
    fig = plot_conflict_over_training(tr, source="balance", rate="step")
    np.testing.assert_allclose(_line(fig, "conflict rate per step").get_ydata(), raw)
    fig = plot_conflict_over_training(tr, rate="both")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "conflict rate per step" in labels and "conflict rate per step (parameters)" in labels
    assert "conflict rate, mean of last 4 probes (parameters)" in labels
    _saved(fig, tmp_path / "both.png")
    with pytest.raises(ValueError, match="rate"):
        plot_conflict_over_training(tr, rate="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        plot_conflict_over_training(tr, window=0)


def test_window_cosine_heatmap_shows_the_window_mean(tmp_path: Path) -> None:
    """The heatmap is the mean of the last ``window`` cosine matrices, not the last step's."""
    tr = _two_task_tracker(window=5)
    fig = plot_window_cosine_heatmap(tr)
    ax = fig.axes[0]
    shown = np.ma.filled(ax.get_images()[0].get_array(), np.nan)
    np.testing.assert_allclose(shown, tr.window_cosine_matrix())
    last = tr.history[-1]["cos[a,b]"]
    assert not np.isclose(shown[0, 1], last)  # not the last step
    assert ax.get_title() == "Cosine: mean of the last 5 sampled steps"
    _saved(fig, tmp_path / "window_heat.png")
    fig = plot_window_cosine_heatmap(tr.history, window=3, source="probe", title=None)
    shown = np.ma.filled(fig.axes[0].get_images()[0].get_array(), np.nan)
    np.testing.assert_allclose(shown, tr.window_cosine_matrix(3, source="probe"))
    assert fig.axes[0].get_title() == "Cosine (parameters): mean of the last 3 probes"
    fig2, axes = plt.subplots(1, 2)
    assert plot_window_cosine_heatmap(tr, ax=axes[1], title="mine") is fig2
    assert axes[1].get_title() == "mine"
    _saved(plot_window_cosine_heatmap(ConflictTracker()), tmp_path / "empty_heat.png")
    with pytest.raises(ValueError, match="source"):
        plot_window_cosine_heatmap(tr, source="all")  # type: ignore[arg-type]


def test_weights_axis_includes_zero() -> None:
    hand = [{"step": s, "weight[a]": 1.0 + 0.02 * (-1) ** s, "weight[b]": 1.0} for s in range(6)]
    lo, hi = plot_weights_over_training(hand).axes[0].get_ylim()
    assert lo == 0.0 and hi >= 1.02  # a 2 % jitter is drawn as one
    lo, hi = plot_weights_over_training(hand, include_zero=False).axes[0].get_ylim()
    assert lo > 0.9
    neg = [{"step": s, "weight[a]": -3.0 - s, "weight[b]": -1.0} for s in range(3)]
    lo, hi = plot_weights_over_training(neg).axes[0].get_ylim()
    assert lo <= -5.0 and hi == 0.0


# ---------------------------------------------------------------------------- experiments/plots
def _fake_results(seeds: list[int], *, valid: bool = True, kinds: str = "mixed") -> dict[str, Any]:
    """A compare results dict (no training): a binary and a regression task, three balancers."""
    tasks = {
        "mixed": [{"name": "ctr", "kind": "binary"}, {"name": "watch", "kind": "regression"}],
        "binary": [{"name": "ctr", "kind": "binary"}, {"name": "cvr", "kind": "binary"}],
    }[kinds]
    rng = np.random.default_rng(0)
    shift = {"equal": 0.0, "mgda": 0.01, "gradops": -0.005}

    def metrics(b: str, seed: int, epoch: int = 3) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t in tasks:
            base = 0.7 + 0.05 * epoch + shift[b] + 0.002 * seed
            if t["kind"] == "binary":
                out[t["name"]] = {"auc": base, "ne": 1.2 - base}
            else:
                out[t["name"]] = {"mse": 2.0 - base}
        return out

    runs = []
    for b in shift:
        for seed in seeds:
            trace = [[s, [1.0 + 0.02 * rng.standard_normal(), 0.5]] for s in range(1, 9)]
            if b == "mgda":
                trace = [[s, [0.4, 0.6]] for s in range(1, 9)]
            history = []
            for e in (1, 2, 3):
                h: dict[str, Any] = {"epoch": e, "score": 0.5 + 0.05 * e}
                if valid:
                    h["valid"] = metrics(b, seed, e)
                history.append(h)
            runs.append({
                "balancer": b, "options": {}, "seed": seed, "metrics": metrics(b, seed),
                "weights_trace": trace, "history": history,
                "weights_kind": "coefficients" if b == "gradops" else "weights",
            })  # fmt: skip
    single = [
        {"task": t["name"], "seed": s, "metrics": {t["name"]: metrics("equal", s)[t["name"]]}}
        for t in tasks
        for s in seeds
    ]
    return {
        "task": "fake", "tasks": tasks, "runs": runs, "single_task": single, "seeds": seeds,
        "config": {"train": {"level": "representation"}},
    }  # fmt: skip


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures ``experiments.plots`` saves (inspectable after they are closed)."""
    plots = pytest.importorskip("experiments.plots")
    figs: list[Figure] = []
    save = plots._save

    def keep(fig: Figure, path: Path) -> Path:
        figs.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def _errorbars(ax: Any) -> int:
    from matplotlib.container import ErrorbarContainer

    return sum(isinstance(c, ErrorbarContainer) for c in ax.containers)


def _suptitle(fig: Figure) -> str:
    """The figure title (``Figure.get_suptitle`` needs matplotlib 3.8; the floor is 3.7)."""
    sup = getattr(fig, "_suptitle", None)
    return "" if sup is None else str(sup.get_text())


def _titles(fig: Figure) -> dict[str, Any]:
    return {ax.get_title(): ax for ax in fig.axes}


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_compare_metrics_honest_axes(tmp_path: Path, captured: list[Figure], n_seeds: int) -> None:
    """AUC bars start at 0.5 (chance), others at 0, one y scale per metric; error bars only
    with n >= 2 (else the title says so); a second row of differences vs EqualWeight."""
    from experiments import plots, report

    res = _fake_results(list(range(n_seeds)), kinds="binary")
    plots.plot_compare_metrics(res, report.summarize(res), tmp_path / "metrics.png")
    fig = captured[-1]
    by_title = _titles(fig)
    auc = [by_title["ctr: AUC ↑"], by_title["cvr: AUC ↑"]]
    ne = [by_title["ctr: NE ↓"], by_title["cvr: NE ↓"]]
    assert auc[0].get_ylim() == auc[1].get_ylim() and auc[0].get_ylim()[0] == 0.5
    assert ne[0].get_ylim() == ne[1].get_ylim() and ne[0].get_ylim()[0] == 0.0
    assert "bars from 0.5 = chance" in auc[0].get_ylabel()
    title = _suptitle(fig)
    if n_seeds == 1:
        assert "n = 1" in title and "no error bar" in title
        assert all(_errorbars(ax) == 0 for ax in fig.axes)
    else:
        assert "mean ± std over 2 seeds" in title
        assert _errorbars(auc[0]) == 3
    diff = by_title["ctr: AUC vs EqualWeight"]
    assert "vs EqualWeight, same seed" in diff.get_ylabel()
    heights = [p.get_height() for p in diff.patches]
    eq = np.mean([0.85 + 0.002 * s for s in range(n_seeds)])
    expected = [100 * 0.01 / eq, 100 * -0.005 / eq]  # MGDA, GradOPS, + = better
    np.testing.assert_allclose(heights, expected, rtol=1e-2)
    ne_diff = by_title["ctr: NE vs EqualWeight"]  # lower NE is better: the sign is flipped
    assert [p.get_height() > 0 for p in ne_diff.patches] == [True, False]


def test_compare_metrics_without_equal_weight(tmp_path: Path, captured: list[Figure]) -> None:
    from experiments import plots, report

    res = _fake_results([0, 1])
    res["runs"] = [r for r in res["runs"] if r["balancer"] != "equal"]
    plots.plot_compare_metrics(res, report.summarize(res), tmp_path / "metrics.png")
    fig = captured[-1]
    assert not any("vs EqualWeight" in t for t in _titles(fig))
    assert "no EqualWeight run" in _suptitle(fig)
    assert _titles(fig)["watch: MSE ↓"].get_ylim()[0] == 0.0


def test_weights_plot_seed_legend_and_scales(tmp_path: Path, captured: list[Figure]) -> None:
    from experiments import plots

    plots.plot_weights(_fake_results([0, 1]), tmp_path / "weights.png")
    fig = captured[-1]
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["ctr", "watch", "seed 0", "seed 1"]
    styles = [h.get_linestyle() for h in legend.legend_handles[2:]]
    assert styles[0] != styles[1]
    by_title = _titles(fig)
    eq, mgda, coef = (
        by_title["EqualWeight"],
        by_title["MGDA-UB"],
        by_title["GradOPS (coefficients)"],
    )
    assert eq.get_ylim() == mgda.get_ylim() and eq.get_ylim()[0] == 0.0
    assert coef.get_ylim()[0] == 0.0 and coef.get_ylabel() == "coefficient (any sign)"
    for ax in (eq, coef):  # one line style per seed
        assert len({ln.get_linestyle() for ln in ax.get_lines()}) == 2
    assert "share one scale" in _suptitle(fig)


def test_weights_plot_own_scales_when_ranges_differ(tmp_path: Path, captured: list[Figure]) -> None:
    from experiments import plots

    res = _fake_results([0])
    for r in res["runs"]:
        if r["balancer"] == "equal":
            r["weights_trace"] = [[s, [50.0, 40.0]] for s in range(1, 5)]  # MultiBalance-like
    plots.plot_weights(res, tmp_path / "weights.png")
    fig = captured[-1]
    eq, mgda = _titles(fig)["EqualWeight"], _titles(fig)["MGDA-UB"]
    assert eq.get_ylim() != mgda.get_ylim() and mgda.get_ylim()[1] < 1.0
    assert "(own scale)" in mgda.get_ylabel()
    assert "own scale" in _suptitle(fig)


def test_curves_one_panel_per_metric_kind_all_epochs(
    tmp_path: Path, captured: list[Figure]
) -> None:
    from experiments import plots

    plots.plot_curves(_fake_results([0, 1]), tmp_path / "curves.png")
    fig = captured[-1]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["validation AUC ↑ (ctr)", "validation MSE ↓ (watch)"]
    auc, mse = fig.axes
    for ax in fig.axes:
        assert ax.get_xlim()[0] < 1 and list(ax.get_xticks()) == [1, 2, 3]
        for ln in ax.get_lines():  # every epoch inside the y range
            lo, hi = ax.get_ylim()
            assert all(lo <= y <= hi for y in ln.get_ydata())
    assert max(ln.get_ydata()[2] for ln in auc.get_lines()) == pytest.approx(0.86 + 0.002)
    assert "seed 1" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_curves_without_per_task_history(tmp_path: Path, captured: list[Figure]) -> None:
    """Runs that kept only the selection score: one AUC panel for binary tasks, an explicitly
    labelled mixed-units panel otherwise."""
    from experiments import plots

    plots.plot_curves(_fake_results([0], valid=False, kinds="binary"), tmp_path / "c1.png")
    assert [ax.get_title() for ax in captured[-1].axes] == ["validation AUC ↑ (mean of ctr, cvr)"]
    plots.plot_curves(_fake_results([0], valid=False), tmp_path / "c2.png")
    (ax,) = captured[-1].axes
    assert "mixed units" in ax.get_title()


def test_sweep_front_titled_with_task_names(tmp_path: Path, captured: list[Figure]) -> None:
    from experiments import plots

    res = _fake_results([0])
    res.update(param="alpha", values=[-1, 0, 1], balancer="gradops")
    res["runs"] = [dict(r, value=v) for v in (-1, 0, 1) for r in res["runs"][:1]]
    plots.plot_sweep(res, tmp_path / "m.png", tmp_path / "f.png")
    metrics_fig, front = captured[-2:]
    title = front.axes[0].get_title()
    assert title.startswith("ctr AUC vs watch MSE across alpha") and "task 1" not in title
    assert "n = 1" in title
    assert all(_errorbars(ax) == 0 for ax in metrics_fig.axes + front.axes)
    assert front.axes[0].texts[0].get_text() == "alpha=-1, 0, 1"  # coinciding points: one label
