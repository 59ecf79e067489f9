"""Tests for the logging sinks of mtl.conflict (TensorBoard, dict, CSV), the rolling-window
statistics of the ConflictTracker, BalanceInfo logging, and the tracker's dashboard."""

from __future__ import annotations

import csv
import math
import sys
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
from mtl.conflict import (  # noqa: E402
    BalanceLogger,
    ConflictTracker,
    CSVSink,
    DictSink,
    HeatmapSink,
    Sink,
    TensorBoardSink,
    balance_scalars,
    cosine_matrix,
    plot_dashboard,
    record_scalars,
    scalar_keys,
)
from tests._sync_count import SyncCounter  # noqa: E402

D64 = torch.float64
NAMES = ["ctr", "cvr", "like"]


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def info_from(
    g: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    *,
    k: int | None = None,
    losses: torch.Tensor | None = None,
    extras: dict[str, Any] | None = None,
    skipped: bool = False,
) -> BalanceInfo:
    k = g.shape[0] if g is not None else int(k or 0)
    return BalanceInfo(
        weights=torch.full((k,), 1.0 / k, dtype=D64) if weights is None else weights.to(D64),
        losses=torch.arange(1, k + 1, dtype=D64) if losses is None else losses,
        gram=None if g is None else (g @ g.T).to(D64),
        level="representation",
        skipped=skipped,
        extras={} if extras is None else extras,
    )


# Four hand-built steps of three tasks (rows = task gradients):
#   step 0: ctr/cvr conflict (cos -1/sqrt2), like orthogonal   -> rate 1/3
#   step 1: all aligned                                        -> rate 0
#   step 2: no Gram matrix (a loss-level step)                 -> rate nan
#   step 3: like is a zero task; ctr/cvr opposite (cos -1)     -> rate 1/3
STEPS: list[torch.Tensor | None] = [
    torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=D64),
    torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=D64),
    None,
    torch.tensor([[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0], [0.0, 0.0, 0.0]], dtype=D64),
]


def _tracked(window: int, sinks: list[Any] | None = None) -> ConflictTracker:
    tr = ConflictTracker(every=1, task_names=NAMES, window=window, sinks=sinks)
    with pytest.warns(RuntimeWarning, match="gram is None"):
        for step, g in enumerate(STEPS):
            tr.update(step, info_from(g, k=3))
    return tr


def _cos(g: torch.Tensor) -> np.ndarray:
    return cosine_matrix(g @ g.T).numpy()


# ---------------------------------------------------------------------- rolling windows
def test_rolling_rate_and_window_heatmap_match_hand_computed_values() -> None:
    tr = _tracked(window=2)
    rates = [r["conflict_rate"] for r in tr.history]
    assert rates[0] == pytest.approx(1 / 3) and rates[1] == 0.0 and math.isnan(rates[2])
    assert rates[3] == pytest.approx(1 / 3)
    # window 2, NaN-aware: [1/3], [1/3, 0], [0, nan], [nan, 1/3]
    expected_rolling = [1 / 3, 1 / 6, 0.0, 1 / 3]
    assert [r["conflict_rate_rolling"] for r in tr.history] == pytest.approx(expected_rolling)
    steps, rolling = tr.rolling_conflict_rate()
    assert steps.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(rolling, expected_rolling, rtol=1e-12)
    # another window on demand: window 3 -> [1/3], [1/6], [1/6], [(0 + 1/3) / 2]
    np.testing.assert_allclose(
        tr.rolling_conflict_rate(window=3)[1], [1 / 3, 1 / 6, 1 / 6, 1 / 6], rtol=1e-12
    )

    c0, c1, c3 = (_cos(g) for g in (STEPS[0], STEPS[1], STEPS[3]) if g is not None)
    assert c0[0, 1] == pytest.approx(-1 / math.sqrt(2)) and c3[0, 1] == pytest.approx(-1.0)
    assert c3[2, 2] == 0.0  # a zero task: cosine 0 with everything, itself included
    # the last window (steps 2, 3): only step 3 has a Gram matrix
    np.testing.assert_allclose(tr.window_cosine_matrix(), c3, atol=1e-12)
    # window 4: mean of steps 0, 1 and 3; the diagonal of `like` is 2/3 (zero once)
    w4 = tr.window_cosine_matrix(window=4)
    np.testing.assert_allclose(w4, (c0 + c1 + c3) / 3, atol=1e-12)
    assert w4[2, 2] == pytest.approx(2 / 3) and w4[0, 0] == 1.0
    # the records carry the window means of their own windows (pairs only)
    rec1 = tr.history[1]
    assert rec1["cos_window[ctr,cvr]"] == pytest.approx((c0[0, 1] + c1[0, 1]) / 2)
    assert rec1["cos_window[cvr,like]"] == pytest.approx((c0[1, 2] + c1[1, 2]) / 2)
    assert tr.history[2]["cos_window[ctr,cvr]"] == pytest.approx(c1[0, 1])  # step 2 has none
    assert np.isnan(ConflictTracker(every=1, task_names=NAMES).window_cosine_matrix()).all()


def test_rolling_values_survive_json_and_csv_round_trips(tmp_path: Path) -> None:
    tr = _tracked(window=2)
    tr.to_json(tmp_path / "t.json")
    back = ConflictTracker.from_json(tmp_path / "t.json")
    assert back.window == 2 and back.state_dict()["window"] == 2
    np.testing.assert_allclose(
        back.series("conflict_rate_rolling")[1], tr.series("conflict_rate_rolling")[1]
    )
    tr.to_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "conflict_rate_rolling" in header and "cos_window[ctr,cvr]" in header
    old = ConflictTracker.from_csv(tmp_path / "t.csv", every=1, window=2)
    np.testing.assert_allclose(old.rolling_conflict_rate()[1], tr.rolling_conflict_rate()[1])
    np.testing.assert_allclose(old.window_cosine_matrix(), tr.window_cosine_matrix())
    # a history saved before the rolling keys existed: the methods recompute them
    for r in old.history:
        del r["conflict_rate_rolling"]
    np.testing.assert_allclose(old.rolling_conflict_rate()[1], tr.rolling_conflict_rate()[1])
    with pytest.raises(ValueError, match="window"):
        ConflictTracker(window=0)


# ---------------------------------------------------------------------- flat dicts
def test_dict_sink_keys_and_values() -> None:
    calls: list[tuple[dict[str, float], int]] = []
    sink = DictSink(lambda d, step: calls.append((d, step)), keep=2)
    kept_nan = DictSink(drop_nan=False)
    tr = _tracked(window=2, sinks=[sink, kept_nan])
    assert [s for _, s in calls] == [0, 1, 2, 3]
    keys = tr.scalar_keys()
    assert keys == scalar_keys(NAMES) and not tr._probes_in_use()
    assert keys[:2] == ["conflict/rate", "conflict/rate_rolling"]
    for key in (
        "conflict/cos/ctr-cvr",
        "conflict/cos_window/cvr-like",
        "conflict/norm/like",
        "conflict/update_cos/ctr",
        "balance/weight/cvr",
        "balance/loss/like",
        "conflict/condition_number",
    ):
        assert key in keys
    d0 = calls[0][0]
    rec0 = tr.history[0]
    assert set(d0) == set(keys)  # nothing missing at step 0
    assert d0["conflict/rate"] == pytest.approx(1 / 3)
    assert d0["conflict/cos/ctr-cvr"] == pytest.approx(-1 / math.sqrt(2))
    assert d0["balance/weight/ctr"] == pytest.approx(1 / 3)
    assert d0["balance/loss/like"] == 3.0
    assert d0["conflict/norm/like"] == rec0["norm[like]"] == pytest.approx(2.0)
    assert all(type(v) is float for v in d0.values())
    # step 2 (no Gram): NaN metrics are left out, weights/losses and rolling values kept
    d2 = calls[2][0]
    assert "conflict/rate" not in d2 and "conflict/cos/ctr-cvr" not in d2
    assert d2["conflict/rate_rolling"] == 0.0 and d2["balance/loss/ctr"] == 1.0
    assert kept_nan.last_step == 3 and list(kept_nan.rows[2][1]) == keys
    assert math.isnan(kept_nan.rows[2][1]["conflict/rate"])
    # keep=2, last; the callback got copies
    assert [s for s, _ in sink.rows] == [2, 3] and sink.last == calls[3][0]
    calls[3][0]["conflict/rate"] = 99.0
    assert sink.last["conflict/rate"] != 99.0
    # tracker.to_dict: the latest balance record, as the sinks got it
    assert tr.to_dict(drop_nan=True) == sink.last
    assert tr.to_dict(tr.history[0]) == kept_nan.rows[0][1]
    assert ConflictTracker().to_dict() == {}
    assert record_scalars(rec0, NAMES) == tr.to_dict(rec0)


def test_scalar_keys_reject_colliding_pair_names_and_bad_sinks() -> None:
    with pytest.raises(ValueError, match="same scalar key"):
        scalar_keys(["a-b", "c", "a", "b-c"])
    with pytest.raises(TypeError, match="write"):
        ConflictTracker(sinks=[object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="task names are not known"):
        ConflictTracker().scalar_keys()
    assert isinstance(DictSink(), Sink) and isinstance(CSVSink("x.csv"), Sink)
    assert not isinstance(DictSink(), HeatmapSink)


def test_sinks_add_no_tensor_reads() -> None:
    """Sink writes use the floats the tracker computed anyway: no extra host transfer."""

    def count(sinks: list[Any]) -> int:
        tr = ConflictTracker(every=1, task_names=NAMES, sinks=sinks)
        infos = [info_from(g) for g in STEPS if g is not None]
        with SyncCounter() as sync:
            for step, info in enumerate(infos):
                tr.update(step, info)
        return sync.total

    assert count([DictSink(), DictSink(drop_nan=False)]) == count([])


# ---------------------------------------------------------------------- CSV
def test_csv_sink_round_trip_and_append(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "conflict.csv"
    sink = CSVSink(path)
    tr = _tracked(window=2, sinks=[sink])
    steps, cols = CSVSink.read(path)
    assert steps.tolist() == [0, 1, 2, 3]
    assert list(cols) == tr.scalar_keys()
    for i, rec in enumerate(tr.history):
        expected = tr.to_dict(rec)
        got = {k: float(v[i]) for k, v in cols.items()}
        assert got == pytest.approx(expected, nan_ok=True, rel=0, abs=0)  # repr: exact
    assert math.isnan(cols["conflict/rate"][2])
    # a resumed run appends under the same header (written once)
    tr2 = ConflictTracker(every=1, task_names=NAMES, sinks=[CSVSink(path)])
    tr2.update(4, info_from(STEPS[0]))
    text = path.read_text()
    assert text.count("step,") == 1
    steps, cols = CSVSink.read(path)
    assert steps.tolist() == [0, 1, 2, 3, 4]
    assert cols["conflict/rate"][4] == pytest.approx(1 / 3)


def test_csv_sink_refuses_to_mix_headers(tmp_path: Path) -> None:
    path = tmp_path / "conflict.csv"
    _tracked(window=2, sinks=[CSVSink(path)])
    before = path.read_bytes()
    other = ConflictTracker(every=1, task_names=["ctr", "cvr"], sinks=[CSVSink(path)])
    with pytest.raises(ValueError, match=r"conflict\.csv.*different header.*unexpected"):
        other.update(0, info_from(torch.eye(2, dtype=D64)))
    assert path.read_bytes() == before  # nothing written
    with pytest.raises(FileExistsError, match="conflict.csv"):
        CSVSink(path, if_exists="error")
    # keys outside the header are never dropped silently
    fixed = CSVSink(tmp_path / "fixed.csv", columns=["a", "b"])
    fixed.write(0, {"a": 1.0, "b": 2.0})
    fixed.write(1, {"a": 3.0})  # missing -> nan
    with pytest.raises(ValueError, match=r"fixed\.csv.*\['c'\]"):
        fixed.write(2, {"a": 1.0, "c": 5.0})
    CSVSink(tmp_path / "fixed.csv", columns=["a", "b"], extra="drop").write(3, {"c": 1.0})
    steps, cols = CSVSink.read(tmp_path / "fixed.csv")
    assert steps.tolist() == [0, 1, 3] and cols["a"].tolist()[:2] == [1.0, 3.0]
    assert math.isnan(cols["b"][1])
    with pytest.raises(ValueError, match="step"):
        CSVSink(tmp_path / "s.csv", columns=["step", "a"])


def test_csv_sink_with_probes_keeps_one_header(tmp_path: Path) -> None:
    path = tmp_path / "probes.csv"
    tr = ConflictTracker(
        every=1, param_level_every=2, task_names=["a", "b"], sinks=[CSVSink(path), DictSink()]
    )
    theta = torch.zeros(3, dtype=D64, requires_grad=True)
    rows = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 1.0, 0.0]], dtype=D64)
    for step in range(1, 6):
        losses = [(theta * rows[k]).sum() for k in range(2)]
        tr.update_parameter_level(step, losses, [theta])
        tr.update(step, info_from(torch.eye(2, dtype=D64)))
    tr.close()
    steps, cols = CSVSink.read(path)
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert "probe/cos/a-b" in cols and "probe/balance" not in " ".join(cols)
    cos = float(rows[0] @ rows[1] / rows[0].norm() / rows[1].norm())
    np.testing.assert_allclose(cols["probe/cos/a-b"], [np.nan, cos, np.nan, cos, np.nan])
    assert not np.isnan(cols["probe/update_cos/a"][[1, 3]]).any()  # completed by update()
    np.testing.assert_allclose(cols["conflict/cos/a-b"], [0.0] * 5)


# ---------------------------------------------------------------------- TensorBoard
class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int | None]] = []
        self.figures: list[tuple[str, Figure, int | None]] = []
        self.flushed = 0
        self.closed = False

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        self.scalars.append((tag, scalar_value, global_step))

    def add_figure(
        self, tag: str, figure: Figure, global_step: int | None = None, close: bool = True
    ) -> None:
        figure.canvas.draw()  # renders without pyplot
        self.figures.append((tag, figure, global_step))

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed = True


def test_tensorboard_sink_with_a_writer_object() -> None:
    w = FakeWriter()
    sink = TensorBoardSink(w, heatmap_every=2)
    assert isinstance(sink, HeatmapSink)
    tr = _tracked(window=2, sinks=[sink])
    tags = {t for t, _, _ in w.scalars}
    assert tags == set(tr.scalar_keys())
    rate = [(s, v) for t, v, s in w.scalars if t == "conflict/rate"]
    assert rate == [(0, pytest.approx(1 / 3)), (1, 0.0), (3, pytest.approx(1 / 3))]  # NaN skipped
    # heatmaps on the 1st and 3rd logged step, of the window means
    assert [(t, s) for t, _, s in w.figures] == [
        ("conflict/cos_window", 0),
        ("conflict/cos_window", 2),
    ]
    assert "mean of the last 1 sampled steps" in w.figures[1][1].axes[0].get_title()
    tr.close()
    assert w.flushed == 1 and not w.closed  # a writer passed in is flushed, not closed
    with pytest.raises(TypeError, match="add_scalar"):
        TensorBoardSink(object())  # type: ignore[arg-type]


def test_tensorboard_sink_names_the_package_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install tensorboard.*mtl-balance\[tensorboard\]"):
        TensorBoardSink(tmp_path / "tb")


def test_tensorboard_event_file_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        SCALARS,
        EventAccumulator,
    )

    logdir = tmp_path / "tb"
    with _tracked(window=2, sinks=[TensorBoardSink(logdir, heatmap_every=3)]) as tr:
        pass  # the with block closes the tracker: the sink closes its writer
    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0, IMAGES: 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(tr.scalar_keys())

    def read(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    # event files store float32
    assert read("conflict/rate") == [
        (0, pytest.approx(1 / 3, rel=1e-6)),
        (1, 0.0),
        (3, pytest.approx(1 / 3, rel=1e-6)),
    ]
    assert read("conflict/rate_rolling") == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in enumerate([1 / 3, 1 / 6, 0.0, 1 / 3])
    ]
    assert read("conflict/cos/ctr-cvr") == [
        (0, pytest.approx(-1 / math.sqrt(2), rel=1e-6)),
        (1, pytest.approx(1 / math.sqrt(2), rel=1e-6)),
        (3, pytest.approx(-1.0, rel=1e-6)),
    ]
    assert read("balance/weight/like") == [(s, pytest.approx(1 / 3, rel=1e-6)) for s in range(4)]
    assert read("balance/loss/cvr") == [(s, 2.0) for s in range(4)]
    images = acc.Images("conflict/cos_window")
    assert [e.step for e in images] == [0, 3] and images[0].encoded_image_string[:4] == b"\x89PNG"


def test_tensorboard_sink_with_a_summary_writer(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    logger = BalanceLogger([TensorBoardSink(writer)], every=2, task_names=["a", "b"])
    for step in range(5):
        logger.update(step, info_from(None, torch.tensor([0.25 * step, 1.0]), k=2))
    logger.close()
    writer.add_scalar("user/own", 1.0, 0)  # the sink left the user's writer open
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("balance/weight/a")] == [
        (0, 0.0),
        (2, 0.5),
        (4, 1.0),
    ]
    assert "user/own" in acc.Tags()["scalars"]


# ---------------------------------------------------------------------- BalanceInfo
def test_balance_scalars_flatten_weights_losses_and_numeric_extras() -> None:
    info = BalanceInfo(
        weights=torch.tensor([[0.2, 0.8], [0.4, 0.6]], dtype=torch.float32),  # per block
        losses=torch.tensor([0.5, 1.5], dtype=D64),
        gram=None,
        level="representation",
        extras={
            "norms": torch.tensor([3.0, 4.0]),
            "alpha": np.array([0.1, 0.9]),
            "lam": 0.5,
            "fallback": True,
            "rank": torch.tensor(2),
            "projections": torch.eye(2),  # a matrix: left out
            "dropped": "non-finite",  # a string: left out
        },
    )
    d = balance_scalars(info, ["a", "b"])
    assert d == pytest.approx(
        {
            "balance/weight/a": 0.3,
            "balance/weight/b": 0.7,
            "balance/loss/a": 0.5,
            "balance/loss/b": 1.5,
            "balance/skipped": 0.0,
            "balance/extras/alpha/a": 0.1,
            "balance/extras/alpha/b": 0.9,
            "balance/extras/fallback": 1.0,
            "balance/extras/lam": 0.5,
            "balance/extras/norms/a": 3.0,
            "balance/extras/norms/b": 4.0,
            "balance/extras/rank": 2.0,
        }
    )
    assert set(balance_scalars(info, extras=False)) == {
        "balance/weight/task0",
        "balance/weight/task1",
        "balance/loss/task0",
        "balance/loss/task1",
        "balance/skipped",
    }
    with SyncCounter() as sync:
        balance_scalars(info)
    assert sync.total == 1  # one host transfer for weights, losses and tensor extras
    with pytest.raises(ValueError, match="3 task names"):
        balance_scalars(info, ["a", "b", "c"])


def test_balance_logger_every_and_sinks(tmp_path: Path) -> None:
    sink = DictSink()
    logger = BalanceLogger([sink, CSVSink(tmp_path / "w.csv")], every=3)
    returned = [logger.update(s, info_from(None, k=2)) for s in range(7)]
    assert [s for s, _ in sink.rows] == [0, 3, 6]
    assert [i for i, r in enumerate(returned) if r is not None] == [0, 3, 6]
    steps, cols = CSVSink.read(tmp_path / "w.csv")
    assert steps.tolist() == [0, 3, 6] and cols["balance/weight/task1"].tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="every"):
        BalanceLogger([], every=0)


def test_tracker_sinks_with_a_balanced_optimizer(tmp_path: Path) -> None:
    from balancers import MGDA

    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    opt = MGDA(torch.optim.SGD(params, lr=0.1), num_tasks=2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    sink = DictSink()
    infos = []
    with ConflictTracker(every=2, task_names=["a", "b"], window=3, sinks=[sink]) as tr:
        for step in range(6):
            z = trunk(x)
            losses = [((heads[k](z).squeeze(1) - y[:, k]) ** 2).mean() for k in range(2)]
            opt.zero_grad()
            infos.append(opt.backward(losses, representation=z))
            opt.step()
            tr.update(step, infos[-1])
    assert [s for s, _ in sink.rows] == [0, 2, 4]
    last = sink.last
    assert last["balance/weight/a"] == pytest.approx(float(infos[4].weights[0]))
    assert last["balance/loss/b"] == pytest.approx(float(infos[4].losses[1]))
    rates = [r["conflict_rate"] for r in tr.history]
    assert last["conflict/rate_rolling"] == pytest.approx(float(np.mean(rates)))


# ---------------------------------------------------------------------- dashboard
def test_dashboard_renders_window_heatmap_and_rolling_rate(tmp_path: Path) -> None:
    tr = _tracked(window=2)
    fig = tr.plot_dashboard()
    assert isinstance(fig, Figure)
    heat, conflict, weights, norms = fig.axes[:4]
    assert heat.get_title() == "Cosine: mean of the last 1 sampled steps"
    np.testing.assert_allclose(
        heat.images[0].get_array().filled(np.nan), tr.window_cosine_matrix(), atol=1e-12
    )
    assert "window 2" in conflict.get_title()
    rolling = [ln for ln in conflict.get_lines() if "conflict rate" in str(ln.get_label())]
    assert len(rolling) == 1
    np.testing.assert_allclose(rolling[0].get_ydata(), tr.rolling_conflict_rate()[1])
    assert weights.get_title() == "Task weights" and norms.get_title() == "Task-gradient norms"
    path = tmp_path / "dashboard.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    # a wider window on demand, the history of a file, an empty tracker
    fig2 = plot_dashboard(tr.history, window=4)
    assert fig2.axes[0].get_title() == "Cosine: mean of the last 3 sampled steps"
    fig3 = ConflictTracker(task_names=["a", "b"]).plot_dashboard()
    fig3.savefig(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="source"):
        tr.plot_dashboard(source="both")  # type: ignore[arg-type]
