"""End-to-end tests of ``python -m experiments`` at tiny sizes (main(argv) in-process, plus one
subprocess for the module entry point)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from balancers import registry
from experiments import config as cfgmod
from experiments.cli import main
from experiments.runner import BalancerError, resolve_balancers

sys.path.insert(0, str(Path(__file__).parent))
from _cli import TINY_SYNTHETIC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = [*TINY_SYNTHETIC, "--epochs", "2"]


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    """The CLI sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pngs_ok(out: Path, names: list[str]) -> None:
    for name in names:
        p = out / name
        assert p.exists(), name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- compare
def test_compare_synthetic_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "synthetic", "--balancers", "equal,mgda", "--seeds", "2",
               "--out", str(out), "--quiet", *TINY])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert res["task"] == "synthetic"
    assert isinstance(res["config"], dict) and res["config"]["train"]["epochs"] == 2
    assert len(res["runs"]) == 4
    assert {(r["balancer"], r["seed"]) for r in res["runs"]} == {
        ("equal", 0), ("equal", 1), ("mgda", 0), ("mgda", 1)
    }  # fmt: skip
    for r in res["runs"]:
        assert {"balancer", "seed", "metrics", "step_time_s", "epochs", "weights_mean"} <= set(r)
        assert set(r["metrics"]) == {"task0", "task1"}
        assert isinstance(r["metrics"]["task0"]["mse"], float)
        assert r["step_time_s"] > 0 and r["epochs"] == 2 and len(r["weights_mean"]) == 2
        assert "delta_m" in r  # the synthetic config asks for single-task baselines
    assert {b["task"] for b in res["single_task"]} == {"task0", "task1"}
    assert len(res["single_task"]) == 4  # 2 tasks x 2 seeds

    md = (out / "results.md").read_text()
    printed = capsys.readouterr().out
    assert md.strip() in printed
    assert "| method |" in md and "task0 MSE" in md and "Δm" in md and "× EW" in md
    assert "| EqualWeight |" in md and "MGDA-UB" in md and "single-task" in md
    assert "±" in md and "1.00×" in md
    assert "Paired with EqualWeight" in md and "seeds better" in md
    _pngs_ok(out, ["metrics.png", "weights.png", "curves.png"])
    # `report` re-renders the same markdown from results.json without training
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == md
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_compare_all_skips_unavailable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(registry.BALANCERS):  # keep the run short
        if name not in ("equal", "mgda"):
            monkeypatch.delitem(registry.BALANCERS, name)
    monkeypatch.setitem(registry.BALANCERS, "notyet", "balancers.notyet:NotYet")
    out = tmp_path / "all"
    rc = main(["compare", "--task", "synthetic", "--balancers", "all", "--seeds", "1",
               "--no-single-task", "--no-plots", "--out", str(out), "--quiet", *TINY])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    assert "notyet" in captured.err and "unavailable" in captured.err
    res = _load(out / "results.json")
    assert [r["balancer"] for r in res["runs"]] == ["equal", "mgda"]
    assert "notyet" in res["unavailable"]
    md = (out / "results.md").read_text()
    assert "Not run" in md and "notyet" in md
    assert "not computed" in md  # no single-task baselines: no Δm


def test_named_missing_or_unknown_balancer_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rc = main(["compare", "--task", "synthetic", "--balancers", "equal,nosuch", "--seeds", "1",
               "--out", str(tmp_path / "x"), "--quiet", *TINY])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown balancer 'nosuch'" in err and "mgda" in err
    assert not (tmp_path / "x").exists()

    monkeypatch.setitem(registry.BALANCERS, "notyet", "balancers.notyet:NotYet")
    rc = main(["run", "--task", "synthetic", "--balancer", "notyet", "--quiet", *TINY])
    assert rc == 2
    assert "'notyet' is not available" in capsys.readouterr().err
    with pytest.raises(BalancerError, match="unknown balancer"):
        resolve_balancers("equal,foo")
    names, missing = resolve_balancers("all")
    assert "notyet" in missing and "equal" in names


def test_bad_configuration_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--task", "synthetic", "--config", "nope", "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["run", "--task", "synthetic", "--set", "oops", "--quiet"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["run", "--task", "toy", "--epochs", "3", "--quiet"]) == 2
    assert "--steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run / sweep
def test_run_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["run", "--task", "synthetic", "--model", "mmoe", "--balancer", "mgda",
               "--option", "normalization=l2", "--seed", "3", "--out", str(out), "--quiet",
               *TINY])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    (run,) = res["runs"]
    assert run["balancer"] == "mgda" and run["seed"] == 3
    assert run["options"] == {"normalization": "l2"}
    assert len(run["history"]) == 2
    assert "MGDA-UB (normalization=l2)" in capsys.readouterr().out
    _pngs_ok(out, ["metrics.png", "weights.png"])


def test_sweep_toy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    rc = main(["sweep", "--task", "toy", "--balancer", "gradops", "--param", "alpha=-1,1",
               "--seeds", "1", "--steps", "40", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert res["param"] == "alpha" and res["values"] == [-1, 1]
    assert len(res["runs"]) == 2 * 5  # two values x five starts
    assert {r["value"] for r in res["runs"]} == {-1, 1}
    for r in res["runs"]:
        assert set(r["metrics"]) == {"L1", "L2"}
        assert len(r["trajectory"]) == 40 // 10 + 1
        assert r["distance_to_pareto"] >= 0
    md = (out / "results.md").read_text()
    assert "| alpha |" in md and md.strip() in capsys.readouterr().out
    _pngs_ok(out, ["sweep_metrics.png", "sweep_front.png", "trajectories.png"])


def test_compare_toy(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    rc = main(["compare", "--task", "toy", "--balancers", "equal,mgda", "--steps", "30",
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert len(res["runs"]) == 2 * 5
    assert res["runs"][0]["start"] == [-8.5, 7.5]
    md = (out / "results.md").read_text()
    assert "distance to Pareto set" in md and "MGDA" in md
    _pngs_ok(out, ["trajectories.png"])


def test_compare_toy_in_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "toy2"
    rc = main(["compare", "--task", "toy", "--balancers", "equal,pcgrad", "--steps", "20",
               "--jobs", "2", "--no-plots", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert [r["balancer"] for r in res["runs"]] == ["equal"] * 5 + ["pcgrad"] * 5
    assert res["jobs"] == 2


def test_sweep_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    rc = main(["sweep", "--task", "synthetic", "--balancer", "gradops", "--param",
               "alpha=0,2", "--seeds", "1", "--out", str(out), "--quiet", *TINY])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert [r["value"] for r in res["runs"]] == [0, 2]
    assert [r["options"]["alpha"] for r in res["runs"]] == [0, 2]
    _pngs_ok(out, ["sweep_metrics.png", "sweep_front.png"])


# ----------------------------------------------------------------------------- census
CENSUS = ROOT.parent / "shared" / "data" / "census-income-kdd" / "census-income.test.gz"


@pytest.mark.skipif(not CENSUS.exists(), reason="shared Census-Income file not available")
def test_compare_census_tiny(tmp_path: Path) -> None:
    out = tmp_path / "census"
    rc = main(["compare", "--task", "census", "--balancers", "equal", "--seeds", "1",
               "--set", "data.max_rows=3000", "--epochs", "1", "--batch-size", "256",
               "--no-single-task", "--no-plots", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert set(res["runs"][0]["metrics"]) == {"education", "never_married"}
    assert set(res["runs"][0]["metrics"]["education"]) == {"auc", "log_loss", "ne"}
    md = (out / "results.md").read_text()
    assert "NOT comparable" in md and "education AUC" in md and "never_married NE" in md


# ----------------------------------------------------------------------------- misc
def test_configs_parse() -> None:
    names = cfgmod.available_configs()
    assert {"synthetic", "census", "census_group1", "census_group3", "toy"} <= set(names)
    for name in names:
        cfg = cfgmod.load_config(name)
        assert cfg["task"] in ("synthetic", "census", "toy")
    assert cfgmod.load_config("census_group3", task="census")["data"]["group"] == 3
    cfg = cfgmod.load_config(
        task="synthetic", overrides=["train.epochs=3", "balancers.gradops.alpha=-2"]
    )
    assert cfg["train"]["epochs"] == 3 and cfg["balancers"]["gradops"]["alpha"] == -2
    assert cfgmod.parse_value("adam") == "adam" and cfgmod.parse_value("[1, 2]") == [1, 2]


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "list"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "equal" in proc.stdout and "synthetic" in proc.stdout


def test_bench_is_dispatched(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("experiments.bench")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "experiments bench" in capsys.readouterr().out


@pytest.mark.parametrize("regularizer", ["scr", "lspr"])
def test_run_with_regularizer(tmp_path: Path, regularizer: str) -> None:
    out = tmp_path / regularizer
    rc = main(["run", "--task", "synthetic", "--balancer", "mgda", "--regularizer", regularizer,
               "--set", "regularizer.epsilon=0.05", "--out", str(out), "--quiet",
               *TINY])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["regularizer"] == {"epsilon": 0.05, "name": regularizer}
    assert "Regularizer: " + regularizer.upper() in (out / "results.md").read_text()


def test_paired_vs_equal_weight_table() -> None:
    """Hand case: per seed, the balancer's MSEs are 20 % and 0 % below EqualWeight's (seed 0) and
    10 % above on one task (seed 1): d_0 = +10 %, d_1 = -5 %."""
    from experiments.report import compare_table, paired_vs_equal

    tasks = [{"name": "a", "kind": "regression"}, {"name": "b", "kind": "regression"}]

    def run(bal: str, seed: int, a: float, b: float) -> dict:
        return {"balancer": bal, "seed": seed, "options": {}, "step_time_s": 0.001,
                "epochs": 1, "metrics": {"a": {"mse": a}, "b": {"mse": b}}}  # fmt: skip

    results = {
        "task": "synthetic",
        "tasks": tasks,
        "seeds": [0, 1],
        "config": {"train": {"level": "representation"}},
        "runs": [
            run("equal", 0, 0.10, 0.20),
            run("equal", 1, 0.10, 0.20),
            run("mgda", 0, 0.08, 0.20),
            run("mgda", 1, 0.11, 0.20),
        ],
    }
    paired = paired_vs_equal(results)
    mean, std, n, wins = paired["mgda"]
    assert n == 2 and wins == 1
    assert mean == pytest.approx(2.5) and std == pytest.approx(math.sqrt(2) * 7.5)
    md = compare_table(results)
    assert "| MGDA-UB | +2.50 ± 10.61 | 1/2 |" in md
    # one seed only, or no EqualWeight: no paired table
    assert paired_vs_equal({**results, "runs": results["runs"][1:]}) == {}


def test_csv_group_column_reports_gauc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CSV with a user column: group ids on the datasets (not a feature), GAUC in the runs and
    the table, GAUC equal to mtl.metrics.gauc of the model's logits, errors without groups."""
    import numpy as np

    from experiments import runner
    from mtl.metrics import gauc
    from mtl.models import build_model
    from tasks import load_csv

    rng = np.random.default_rng(0)
    lines = ["user,age,city,clicks,bought"]
    for i in range(150):
        click, buy = int(rng.random() < 0.4), int(rng.random() < 0.3)
        lines.append(f"u{i % 10},{30 + i % 7 + 5 * click},{'abc'[i % 3]},{click},{buy}")
    path = tmp_path / "clicks.csv"
    path.write_text("\n".join(lines) + "\n")
    data = {"numeric": ["age"], "categorical": ["city"], "tasks": {"click": "clicks > 0",
            "buy": "bought"}}  # fmt: skip
    s = load_csv(path, **data, group_column="user")
    assert s.has_groups and s.info["group_column"] == "user" and s.info["num_groups"] == 10
    assert "user" not in s.schema.numeric + s.schema.categorical
    parts = (s.train, s.valid, s.test)
    assert all(p.groups is not None and p.groups.shape == (len(p),) for p in parts)
    assert torch.cat([p.groups for p in parts]).unique().numel() == 10  # type: ignore[misc]
    assert not load_csv(path, **data).has_groups
    with pytest.raises(ValueError, match="input feature"):
        load_csv(path, numeric=["age"], categorical=["user"], tasks=data["tasks"],
                 group_column="user")  # fmt: skip
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([*lines[:5], "?,30,a,1,0", *lines[5:]]) + "\n")
    with pytest.raises(ValueError, match="line 6.*missing group id"):
        load_csv(bad, **data, group_column="user")

    # the runner's GAUC is mtl.metrics.gauc of the model's logits on the test rows
    cfg = {"task": "csv", "data": {"path": str(path), **data, "group_column": "user"},
           "table_metrics": {"binary": ["auc", "calibration"]}}  # fmt: skip
    splits = runner.load_splits(cfg, 0)
    single = runner.single_task_splits(splits, 1)
    assert single.has_groups and torch.equal(single.test.groups, splits.test.groups)
    torch.manual_seed(0)
    model = build_model("shared_bottom", **splits.model_kwargs())
    extra = runner.extra_metrics(model, splits.test, ["gauc", "calibration"])
    with torch.no_grad():
        logits = model(splits.test.features).task_outputs
    for k, name in enumerate(splits.task_names):
        y = splits.test.targets[k]
        assert extra[name]["gauc"] == pytest.approx(
            gauc(y, logits[k].double(), splits.test.groups), abs=1e-12
        )
        assert extra[name]["calibration"] == pytest.approx(
            float(torch.sigmoid(logits[k].double()).mean() / y.double().mean()), rel=1e-9
        )

    out = tmp_path / "cmp"
    common = ["--task", "csv", "--data-path", str(path), "--balancers", "equal", "--seeds", "1",
              "--set", 'data.numeric=["age"]', "--set", 'data.categorical=["city"]',
              "--set", "data.tasks.click=clicks > 0", "--set", "data.tasks.buy=bought",
              "--set", "model.name=shared_bottom", "--epochs", "1", "--batch-size", "64",
              "--no-plots", "--quiet"]  # fmt: skip
    rc = main(["compare", *common, "--set", "data.group_column=user", "--single-task",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = _load(out / "results.json")
    assert res["data"]["has_groups"] and res["data"]["group_column"] == "user"
    assert res["config"]["table_metrics"]["binary"][:2] == ["auc", "gauc"]
    for rec in [*res["runs"], *res["single_task"]]:
        for task, m in rec["metrics"].items():
            assert 0.0 <= m["gauc"] <= 1.0, (task, m)
            assert "calibration" not in m  # only when a metric list names it
    assert "click gauc" in (out / "results.md").read_text().lower()
    # gauc asked for without a group column: a clear error before training
    capsys.readouterr()
    rc = main(["compare", *common, "--set", 'table_metrics.binary=["auc", "gauc"]',
               "--out", str(tmp_path / "nogroups")])  # fmt: skip
    assert rc != 0
    assert "no group ids" in capsys.readouterr().err
