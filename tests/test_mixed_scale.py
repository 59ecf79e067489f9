"""Issue 18: the mixed-scale settings (census ``mixed`` / ``mixed_sparse``, synthetic loss
scales) and the tuned static-weight baseline (``tune-static``, ``compare --tuned-static``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import cli
from experiments.tune_static import load_tuned, static_weight_grid, tuned_label
from tasks.census import CENSUS_COLUMNS, load_census

sys.path.insert(0, str(Path(__file__).parent))
from test_tasks import _census_rows, _write_census  # noqa: E402


@pytest.fixture()
def census_dir(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    rows = _census_rows(400, seed=0)
    _write_census(tmp_path / "census-income.test.gz", rows, gz=True)
    return tmp_path, rows


def _column(rows: list[list[str]], name: str) -> np.ndarray:
    j = CENSUS_COLUMNS.index(name)
    return np.array([float(r[j]) for r in rows])


@pytest.mark.parametrize(
    ("group", "first", "dropped"),
    [
        ("mixed", "income", {"weeks_worked", "num_emp", "marital_stat"}),
        ("mixed_sparse", "has_capital_gains", {"capital_gains", "weeks_worked", "num_emp"}),
        ("mixed-sparse", "has_capital_gains", {"capital_gains", "weeks_worked", "num_emp"}),
    ],
)
def test_census_mixed_groups(census_dir, group: str, first: str, dropped: set[str]) -> None:
    path, rows = census_dir
    s = load_census(group, path=path, seed=0)
    assert s.task_names == [first, "never_married", "weeks_worked"]
    assert [t.kind for t in s.tasks] == ["binary", "binary", "regression"]
    inputs = set(s.schema.numeric) | set(s.schema.categorical)
    assert not dropped & inputs
    assert s.name == f"census-income/{group.replace('-', '_')}"
    # the regression target is in raw units (never standardised), the binary ones are 0/1
    y = np.concatenate([p.y.numpy() for p in (s.train, s.valid, s.test)])
    assert sorted(y[:, 2].tolist()) == sorted(_column(rows, "weeks_worked").tolist())
    assert set(np.unique(y[:, :2])) <= {0.0, 1.0}
    if first == "has_capital_gains":
        expected = (_column(rows, "capital_gains") > 0).sum()
        assert y[:, 0].sum() == expected


def test_census_mixed_stratifies_on_the_binary_tasks_only(census_dir) -> None:
    path, _ = census_dir
    s = load_census("mixed", path=path, seed=1)
    y = np.concatenate([p.y.numpy() for p in (s.train, s.valid, s.test)])
    for part in (s.train, s.valid, s.test):
        rate = part.y.numpy()[:, :2].mean(0)
        assert np.all(np.abs(rate - y[:, :2].mean(0)) <= 2.0 / len(part) + 1e-6)


def test_unknown_group_names_the_choices(census_dir) -> None:
    path, _ = census_dir
    with pytest.raises(ValueError, match="mixed_sparse"):
        load_census("mixd", path=path)


# ------------------------------------------------------------------------------ tune-static
def test_static_weight_grid() -> None:
    assert static_weight_grid(1, [0.1, 1.0]) == [[1.0]]
    grid = static_weight_grid(3, [0.1, 10.0], anchor=1)
    assert grid == [[0.1, 1.0, 0.1], [0.1, 1.0, 10.0], [10.0, 1.0, 0.1], [10.0, 1.0, 10.0]]
    with pytest.raises(ValueError, match="positive"):
        static_weight_grid(2, [0.0, 1.0])
    with pytest.raises(ValueError, match="distinct"):
        static_weight_grid(2, [1.0, 1.0])
    with pytest.raises(ValueError, match="anchor"):
        static_weight_grid(2, [1.0], anchor=2)


SMALL = ["--task", "synthetic", "--set", "data.num_samples=1500", "--epochs", "2", "--quiet"]


def test_tune_static_then_compare(tmp_path: Path, capsys) -> None:
    """The grid is searched on the validation metrics; compare trains the winner on its own
    seeds under the row 'static weights (tuned, N runs)'."""
    tune = tmp_path / "tune"
    rc = cli.main(["tune-static", *SMALL, "--set", "data.loss_scales=[1,30]",
                   "--grid", "0.001,1", "--out", str(tune), "--jobs", "1"])  # fmt: skip
    assert rc == 0
    tuned = json.loads((tune / "tuned.json").read_text())
    results = json.loads((tune / "results.json").read_text())
    assert tuned["num_runs"] == 2 and len(results["runs"]) == 2
    scores = {tuple(s["weights"]): s["valid_delta_m"] for s in results["scores"]}
    assert set(scores) == {(1.0, 0.001), (1.0, 1.0)}
    best = max(scores, key=lambda w: scores[w])
    assert tuned["weights"] == list(best)
    # the score is the validation Δm: recompute one from the stored records
    from experiments import report

    base = {}
    for r in results["single_task"]:
        base.update(r["valid_metrics"])
    for r in results["runs"]:
        dm = report.delta_m_for(r["valid_metrics"], base, results["tasks"])
        assert dm == pytest.approx(scores[tuple(r["value"])])
    capsys.readouterr()

    out = tmp_path / "cmp"
    rc = cli.main(["compare", *SMALL, "--set", "data.loss_scales=[1,30]", "--balancers",
                   "equal", "--seeds", "2", "--no-plots", "--tuned-static", str(tune),
                   "--out", str(out)])  # fmt: skip
    assert rc == 0
    md = (out / "results.md").read_text()
    assert tuned_label(2) in md
    runs = json.loads((out / "results.json").read_text())["runs"]
    mine = [r for r in runs if r.get("variant") == tuned_label(2)]
    assert [r["seed"] for r in mine] == [0, 1]
    assert all(r["options"]["weights"] == tuned["weights"] for r in mine)


def test_tuned_static_must_match_the_comparison(tmp_path: Path, capsys) -> None:
    tune = tmp_path / "tune"
    assert cli.main(["tune-static", *SMALL, "--grid", "1", "--out", str(tune)]) == 0
    capsys.readouterr()
    rc = cli.main(["compare", *SMALL, "--set", "data.loss_scales=[1,30]", "--balancers",
                   "equal", "--seeds", "1", "--no-plots", "--tuned-static", str(tune)])  # fmt: skip
    assert rc == 2
    assert "tuned with data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not found"):
        load_tuned(tmp_path / "nowhere", {})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tune-static result"):
        load_tuned(tmp_path / "bad.json", {})


def test_tune_static_bad_grid_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["tune-static", *SMALL, "--grid", "a,b", "--out", str(tmp_path / "x")]) == 2
    assert "--grid" in capsys.readouterr().err
    assert cli.main(["tune-static", *SMALL, "--grid", "-1", "--out", str(tmp_path / "y")]) == 2
    assert "positive" in capsys.readouterr().err


# ------------------------------------------------------------- coefficients are labelled so
def test_projection_methods_declare_coefficients() -> None:
    from balancers import MGDA, GradOPS, MultiBalance, PCGrad

    assert GradOPS.weights_kind == PCGrad.weights_kind == "coefficients"
    assert MGDA.weights_kind == MultiBalance.weights_kind == "weights"


def test_report_labels_coefficients_and_variant_rows() -> None:
    from experiments import report

    tasks = [{"name": "a", "kind": "regression"}, {"name": "b", "kind": "regression"}]

    def run(balancer: str, seed: int, w: list[float], **extra: object) -> dict[str, object]:
        return {"balancer": balancer, "seed": seed, "options": {}, "weights_mean": w,
                "metrics": {"a": {"mse": 1.0 + seed}, "b": {"mse": 2.0}},
                "step_time_s": 0.001, "epochs": 3, **extra}  # fmt: skip

    results = {
        "task": "synthetic",
        "tasks": tasks,
        "config": {"train": {"level": "representation"}},
        "seeds": [0, 1],
        "runs": [
            run("equal", 0, [1.0, 1.0]),
            run("equal", 1, [1.0, 1.0]),
            run("gradops", 0, [26.0, -105.0], weights_kind="coefficients"),
            run("pcgrad", 0, [1.0, 1.0]),  # an old result without the field
            run("equal", 0, [1.0, 0.01], variant="static weights (tuned, 4 runs)"),
            run("equal", 1, [1.0, 0.01], variant="static weights (tuned, 4 runs)"),
        ],
    }
    md = report.compare_table(results)
    rows: dict[str, str] = {}
    for line in md.splitlines():  # the main table comes first (the paired table repeats names)
        if "|" in line:
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert "coef. [26.00, -105.00]" in rows["GradOPS"]
    assert "coef. [1.00, 1.00]" in rows["PCGrad"]
    assert "coef." not in rows["EqualWeight"]
    assert "[1.00, 0.01]" in rows["static weights (tuned, 4 runs)"]
    summary = report.summarize(results)
    assert summary["balancers"]["equal"]["n"] == 2  # the tuned rows are not merged into it


def test_vs_tuned_relative_gaps() -> None:
    from experiments import report

    tasks = [{"name": "ctr", "kind": "binary"}, {"name": "watch", "kind": "regression"}]

    def run(balancer: str, auc: float, mse: float, variant: str | None = None) -> dict:
        return {"balancer": balancer, "seed": 0, "options": {}, "variant": variant,
                "metrics": {"ctr": {"auc": auc}, "watch": {"mse": mse}}}  # fmt: skip

    label = "static weights (tuned, 9 runs)"
    results = {
        "tasks": tasks,
        "config": {},
        "runs": [
            run("equal", 0.70, 90.0),
            run("mgda", 0.80, 110.0),
            run("equal", 0.80, 100.0, label),
        ],
    }
    tuned, gaps = report.vs_tuned(results)
    assert tuned == label
    assert gaps["equal"] == pytest.approx({"ctr AUC": -12.5, "watch MSE": 10.0})
    assert gaps["mgda"] == pytest.approx({"ctr AUC": 0.0, "watch MSE": -10.0})
    md = report.compare_table(results)
    assert "| EqualWeight | -12.50 | +10.00 | no |" in md
    results["runs"] = results["runs"][:2]
    assert report.vs_tuned(results) is None
