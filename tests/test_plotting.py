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
    assert labels == ["pairwise cosines", "conflict rate"]
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
