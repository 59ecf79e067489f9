"""Tests of the benchmark harness ``python -m experiments bench`` (the package experiments/bench/).

The --quick run end to end (JSON shape, markdown, ratios, the overhead section and its sync
counts), the interleaved timing helper on fake callables with a fake clock, the exact sparse-aware
Gram, the host-sync counter, ``--device cuda`` without CUDA, and the path where the peer libraries
(TorchJD, torch-rechub) are missing. No timing is asserted: only shapes and invariants.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from balancers import registry
from experiments.bench import cli, options, peers, stages
from experiments.bench.budget import budget_table
from experiments.bench.derived import derived_tables
from experiments.bench.memory import run_memory_cuda
from experiments.bench.model import OVERHEAD_MODEL, BenchModelConfig, build_group, task_losses
from experiments.bench.modes import ModeSpec, count_backward_syncs, make_mode, uses_task_gradients
from experiments.bench.progress import NullBar
from experiments.bench.sections import memory_guard, run_section
from experiments.bench.studies import sparse_aware_gram
from experiments.bench.syncs import SYNC_NAMES, SyncCounter, count_syncs
from experiments.bench.tables import render_markdown
from experiments.bench.timing import device_clock, interleaved_timings, ratio_summary
from mtl import CombinedOptimizer


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    """--quick sets torch's thread count to 1; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench_quick")
    try:
        rc = cli.main(["--quick", "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    with open(out / "results.json", encoding="utf-8") as f:
        return out, json.load(f)


def test_quick_run_writes_outputs(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, res = quick_run
    assert set(res) >= {
        "meta",
        "peers",
        "sections",
        "derived",
        "marigold_lambda",
        "mgda_agreement",
        "budget",
    }
    assert set(res["sections"]) == {"rep", "param", "h2h", "overhead"}
    assert res["meta"]["device"] == "cpu"
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| mode | level | K | ratio [min–max] | ms/step | peak RSS MB | RSS ratio |" in md
    assert "Performance budget" in md
    assert res["meta"]["elapsed_s"] > 0
    assert res["meta"]["model"]["fields"] >= 8
    assert {b["item"].split(" ")[0] for b in res["budget"]} >= {"representation-level", "peak"}
    items = [b["item"] for b in res["budget"]]
    for level in ("representation level", "parameter level"):
        assert any(i.startswith(f"MARIGOLD step ({level}") for i in items), items
    for plot in res["meta"].get("plots", []):
        assert (out / plot).stat().st_size > 0


def test_quick_run_ratios(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, res = quick_run
    rep = res["sections"]["rep"]
    assert rep["tasks"] == [2, 4]
    modes = {r["mode"] for r in rep["results"]}
    assert {"plain", "rep:equal", "rep:mgda", "rep:multibalance"} <= modes
    measured = 0
    for section in res["sections"].values():
        for r in section["results"]:
            if r["mode"] == "plain":
                assert r["error"] is None
                assert r["ratio"] == 1.0 and r["ratio_min"] == 1.0 and r["ratio_max"] == 1.0
            if r.get("error") is None:
                measured += 1
                assert r["ratio"] > 0 and r["ratio_min"] > 0 and r["ratio_max"] >= r["ratio_min"]
                assert r["ms_per_step"] > 0
                assert r["repeats"] == section["repeats"]
                assert len(r["ratios"]) == section["repeats"]
    assert measured >= 10
    # every K of every section has a plain baseline
    for section in res["sections"].values():
        ks = {r["K"] for r in section["results"]}
        plain_ks = {r["K"] for r in section["results"] if r["mode"] == "plain"}
        assert ks == plain_ks


def test_quick_run_memory_children(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, res = quick_run
    rep = res["sections"]["rep"]
    assert rep["memory"]["modes"] == ["plain", "rep:mgda"]
    k = rep["memory"]["K"]
    rows = {r["mode"]: r for r in rep["results"] if r["K"] == k}
    assert rows["plain"]["rss_mb"] > 50  # torch alone is ~300 MB
    assert rows["plain"]["rss_mb"] < 4000  # not the parent's high-water mark (ru_maxrss trap)
    assert rows["plain"]["rss_ratio"] == 1.0
    assert rows["rep:mgda"]["rss_ratio"] > 0


def test_quick_run_derived(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, res = quick_run
    d = res["derived"]
    assert [r["K"] for r in d["mgda_ub"]] == [2, 4]
    assert all(r["time_ratio"] > 0 for r in d["mgda_ub"])
    assert [r["K"] for r in d["multibalance"]] == [2, 4]
    assert [r["K"] for r in d["diagnostics"]] == [2, 4]
    lam = res["marigold_lambda"]["runs"]
    assert lam and lam[0]["K"] == 2
    if lam[0]["error"] is None:
        recs = lam[0]["records"]
        assert recs and all(r["l1"] >= 0 and r["l1"] <= 2 + 1e-9 for r in recs)
        assert all(abs(sum(r["mgda"]) - 1) < 1e-9 for r in recs)


def test_quick_run_overhead_section(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, res = quick_run
    ov = res["sections"]["overhead"]
    assert ov["tasks"] == [2, 4]
    assert ov["steps_per_block"] == options.QUICK["overhead_steps"]
    m = ov["model"]
    small = OVERHEAD_MODEL
    assert (m["fields"], m["dim"], m["batch_size"]) == (
        small["fields"],
        small["dim"],
        small["batch_size"],
    )
    assert ov["rows_per_table"] == small["rows"]
    assert "memory" not in ov  # time only: no peak-RSS children
    modes = {r["mode"] for r in ov["results"]}
    assert {"plain", "rep:mgda", "rep:multibalance", "rep:gradops", "rep:pcgrad"} <= modes
    assert all(r["level"] in ("-", "representation") for r in ov["results"])
    for r in ov["results"]:
        if r["error"] is None:
            assert r["ratio"] > 0 and r["repeats"] == ov["repeats"]
            assert isinstance(r["syncs_per_backward"], int) and r["syncs_per_backward"] >= 0
            assert sum(r["syncs_by_name"].values()) == r["syncs_per_backward"]
            assert set(r["syncs_by_name"]) <= SYNC_NAMES
        if r["mode"] == "plain":
            assert r["syncs_per_backward"] == 0  # sum(losses).backward() asks the host nothing
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| mode | level | K | ratio [min–max] | ms/step | syncs/backward | note |" in md
    items = {b["item"]: b for b in res["budget"]}
    line = items["CPU overhead section: representation-level MGDA <= 1.3x plain at K=4"]
    mgda4 = [r for r in ov["results"] if r["mode"] == "rep:mgda" and r["K"] == 4]
    if mgda4 and mgda4[0]["error"] is None:
        assert line["met"] is (mgda4[0]["ratio"] <= 1.3)
    assert any(i.startswith("host synchronizations") for i in items)


def test_quick_run_peers(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, res = quick_run
    names = {r["mode"] for r in res["sections"]["param"]["results"]}
    if res["peers"]["torchjd"]["available"]:
        assert {"torchjd:mgda:emb", "torchjd:upgrad:noemb", "torchjd:pcgrad:emb"} <= names
        ag = res["mgda_agreement"]
        assert ag["available"]
        # exact solver vs Frank-Wolfe on the same Gram: close, and never a worse objective
        assert ag["torchjd_tight"]["max_abs_diff"] < 1e-3
        assert ag["objective_ours"] <= ag["torchjd_default"]["objective"] * (1 + 1e-6) + 1e-12
    else:
        assert not any(n.startswith("torchjd") for n in names)
    if res["peers"]["rechub"]["available"]:
        assert "rechub:metabalance" in names


# ---------------------------------------------------------------------- timing helper
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_modes(clock: FakeClock, costs: dict[str, float], log: list[str]) -> dict[str, Any]:
    def make(name: str, cost: float) -> Any:
        def fn() -> None:
            log.append(name)
            clock.now += cost * getattr(clock, "load", 1.0)

        return fn

    return {n: make(n, c) for n, c in costs.items()}


def test_interleaved_timings_exact_on_fake_clock() -> None:
    clock, log = FakeClock(), list[str]()
    modes = _fake_modes(clock, {"plain": 1.0, "a": 2.0, "b": 3.0}, log)
    res = interleaved_timings(
        modes, repeats=3, warmup=1, steps={"plain": 2, "a": 1, "b": 4}, clock=clock, collect=False
    )
    assert res.errors == {}
    assert res.times == {"plain": [1.0] * 3, "a": [2.0] * 3, "b": [3.0] * 3}
    # rotated round-robin: every round runs every mode once, starting one further each time
    assert res.order == [
        ["plain", "a", "b"],
        ["a", "b", "plain"],
        ["b", "plain", "a"],
        ["plain", "a", "b"],
    ]
    # blocks are contiguous: 2 plain calls, 1 a call, 4 b calls per round
    assert log[:7] == ["plain", "plain", "a", "b", "b", "b", "b"]
    assert log.count("plain") == 2 * 4 and log.count("a") == 4 and log.count("b") == 16
    s = ratio_summary(res.times["b"], res.times["plain"])
    assert s["ratio"] == 3.0 and s["ratio_min"] == 3.0 and s["ratio_max"] == 3.0
    assert s["ms_per_step"] == 3000.0 and s["repeats"] == 3


def test_ratios_cancel_load_that_drifts_between_rounds() -> None:
    """A load factor that changes from round to round scales a whole round alike."""
    clock, log = FakeClock(), list[str]()
    modes = _fake_modes(clock, {"plain": 1.0, "x": 1.5}, log)
    loads = [1.0, 3.0, 0.5, 2.0]  # one load factor per round (warm-up + 3 timed)
    done = {"blocks": 0}

    def on_block(_name: str, _round: int) -> None:
        done["blocks"] += 1
        clock.load = loads[min(done["blocks"] // 2, 3)]  # type: ignore[attr-defined]

    clock.load = 1.0  # type: ignore[attr-defined]
    res = interleaved_timings(
        modes, repeats=3, warmup=1, clock=clock, on_block=on_block, collect=False
    )
    s = ratio_summary(res.times["x"], res.times["plain"])
    assert s["ratio"] == pytest.approx(1.5)
    assert s["ratio_min"] == pytest.approx(1.5) and s["ratio_max"] == pytest.approx(1.5)
    assert s["ms_min"] < s["ms_max"]  # the raw times did drift


def test_interleaved_timings_failing_mode_is_recorded_and_skipped() -> None:
    clock, log = FakeClock(), list[str]()
    calls = {"n": 0}

    def bad() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom\nsecond line")

    modes = {**_fake_modes(clock, {"plain": 1.0}, log), "bad": bad}
    res = interleaved_timings(modes, repeats=3, warmup=1, clock=clock, collect=False)
    assert res.errors == {"bad": "RuntimeError: boom"}
    assert res.times["bad"] == []
    assert calls["n"] == 2
    assert res.times["plain"] == [1.0, 1.0, 1.0]
    assert math.isnan(ratio_summary(res.times["bad"], res.times["plain"])["ratio"])


def test_interleaved_timings_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats"):
        interleaved_timings({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="steps"):
        interleaved_timings({"a": lambda: None}, repeats=1, steps={"a": 0})


# ---------------------------------------------------------------------- pieces
TINY = BenchModelConfig(bottom=(8,), tower=(4,), batch_size=16, numeric=3, num_batches=2)


def test_sparse_aware_gram_matches_dense_gram() -> None:
    k, rows = 3, 50
    sparse = build_group("t", TINY, k, rows, True, seed=3)
    dense = build_group("t", TINY, k, rows, False, seed=3)
    dense.model.load_state_dict(sparse.model.state_dict())
    x, ys = sparse.batches[0]
    g_sparse = sparse_aware_gram(task_losses(sparse.model(x).task_outputs, ys), sparse.shared)
    g_dense = sparse_aware_gram(task_losses(dense.model(x).task_outputs, ys), dense.shared)
    assert g_sparse.dtype == torch.float64 and g_sparse.shape == (k, k)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


def test_per_task_gradient_bytes_counts_touched_rows_of_sparse_tables() -> None:
    """The memory guard's estimate: dense tables in full, sparse ones by touched rows only (so
    parameter-level MGDA with 1M-row sparse tables is not skipped as if they were dense)."""
    rows = 10_000
    sparse = build_group("t", TINY, 2, rows, True, seed=3)
    dense = build_group("t", TINY, 2, rows, False, seed=3)
    assert dense.per_task_gradient_bytes() == dense.shared_bytes()
    tables = TINY.fields * rows * TINY.dim * 4
    touched = TINY.fields * TINY.batch_size * (TINY.dim * 4 + 8)
    assert sparse.per_task_gradient_bytes() == sparse.shared_bytes() - tables + touched


# ---------------------------------------------------------------------- host syncs
def test_sync_counter_counts_top_level_host_syncs() -> None:
    t = torch.tensor([1.5, 0.0, 2.0])
    with SyncCounter() as c:
        t[0].item()
    assert c.total == 1 and dict(c.counts) == {"item": 1}
    assert count_syncs(lambda: t + 1).total == 0
    assert count_syncs(lambda: (t * 2).sum()).total == 0

    def many() -> None:
        t.tolist()
        bool(t[0] > 0)
        float(t[0])
        int(t[2])
        t.cpu()
        t.numpy()
        torch.nonzero(t)  # nested work inside nonzero is not re-dispatched: counted once
        if t[1]:
            pass

    c = count_syncs(many)
    assert dict(c.counts) == {
        "tolist": 1,
        "__bool__": 2,
        "__float__": 1,
        "__int__": 1,
        "cpu": 1,
        "numpy": 1,
        "nonzero": 1,
    }
    assert c.total == 8
    c.reset()
    assert c.total == 0
    assert count_syncs(lambda: t.sum().item(), names=("sum",)).total == 1  # custom names


def test_count_backward_syncs_counts_inside_backward_only() -> None:
    group = build_group("t", TINY, 2, 40, False, seed=1)
    plain = make_mode(ModeSpec(name="plain", kind="plain"), group)
    res = count_backward_syncs(plain)
    assert res == {"total": 0, "by_name": {}}
    assert plain.backward_context == [None]  # type: ignore[attr-defined]  # slot cleared
    ours = make_mode(
        ModeSpec(name="rep:mgda", kind="ours", method="mgda", level="representation"), group
    )
    res = count_backward_syncs(ours)
    assert res is not None and res["total"] >= 0
    assert sum(res["by_name"].values()) == res["total"]
    assert count_backward_syncs(lambda: None) is None  # not a bench mode (e.g. a peer)
    assert device_clock("cpu") is time.perf_counter


def test_modes_train_with_the_combined_optimizer() -> None:
    group = build_group("t", TINY, 2, 40, True, seed=1)
    specs = [
        ModeSpec(name="plain", kind="plain"),
        ModeSpec(name="rep:mgda", kind="ours", method="mgda", level="representation"),
        ModeSpec(name="param:marigold", kind="ours", method="marigold", level="parameters"),
        ModeSpec(name="t", kind="tracker", method="mgda", level="representation"),
    ]
    before = [p.detach().clone() for p in group.model.parameters()]
    for spec in specs:
        fn = make_mode(spec, group)
        for _ in range(2):
            fn()
    after = list(group.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------------- registry balancers
def _resolved(argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    return options.resolve(parser.parse_args(argv.split()))


def test_balancers_option_takes_registry_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """--balancers as compare takes it: the core six by default, groups, 'all', names; group
    members that are not registered (or do not import) are noted and skipped."""
    assert _resolved("--quick").balancers == list(registry.GROUPS["core"])
    loss = _resolved("--quick --balancers loss")
    assert loss.balancers == list(registry.GROUPS["loss"]) and loss.unavailable_balancers == {}
    assert _resolved("--quick --balancers uw,MGDA-UB,uw").balancers == ["uw", "mgda"]
    everything = _resolved("--quick --balancers all")
    assert set(everything.balancers) | set(everything.unavailable_balancers) == set(
        registry.BALANCERS
    )
    monkeypatch.setitem(registry.GROUPS, "loss", ("uw", "notyet"))
    args = _resolved("--quick --balancers loss,gradnorm")
    assert args.balancers == ["uw", "gradnorm"]
    assert "notyet" in args.unavailable_balancers
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        _resolved("--quick --balancers uw,nope")


@pytest.mark.parametrize("level", ["representation", "parameters"])
def test_famo_mode_reruns_the_model_after_the_step(level: str) -> None:
    """FAMO's closure (no argument, the whole model on the step's batch, at both levels) runs in
    step(); its losses update the logits at the next backward."""
    group = build_group("t", TINY, 2, 40, True, seed=1)
    prefix = "rep" if level == "representation" else "param"
    fn = make_mode(ModeSpec(name=f"{prefix}:famo", kind="ours", method="famo", level=level), group)
    infos = [fn() for _ in range(3)]
    assert infos[0].extras["logits_updated"] is False
    assert all(i.extras["logits_updated"] for i in infos[1:])
    assert fn.balancer.balancer_state["num_updates"] == 2  # type: ignore[attr-defined]


def test_loss_level_and_gradnorm_run_in_quick_sections() -> None:
    """Loss-level methods (UW; FAMO with its closure) and GradNorm in sections rep and param:
    every mode measured, none skipped by the memory guard (loss-level: no per-task gradient)."""
    args = _resolved(
        "--quick --sections rep,param --tasks 2 --balancers uw,famo,gradnorm --no-diagnostics "
        "--no-peers --memory none --repeats 1 --param-repeats 1 --warmup 0"
    )
    assert args.balancers == ["uw", "famo", "gradnorm"]
    cfg = options.model_config(args)
    for section, prefix in (("rep", "rep"), ("param", "param")):
        data = run_section(section, args, cfg, peers.peer_status(), lambda **_: NullBar())
        rows = {r["mode"]: r for r in data["results"]}
        for name in ("uw", "famo", "gradnorm"):
            r = rows[f"{prefix}:{name}"]
            assert r["error"] is None, r["error"]
            assert r["ratio"] > 0 and r["ms_per_step"] > 0
    assert uses_task_gradients("gradnorm") and uses_task_gradients("mgda")
    assert not uses_task_gradients("uw") and not uses_task_gradients("famo")
    assert not uses_task_gradients("marigold")
    spec = ModeSpec(name="param:uw", kind="ours", method="uw", level="parameters")
    assert memory_guard(spec, 2**50, 16) is None  # never skipped: no per-task gradient
    spec = ModeSpec(name="param:gradnorm", kind="ours", method="gradnorm", level="parameters")
    assert memory_guard(spec, 2**50, 16) is not None


# ---------------------------------------------------------------------- peers missing
def _hide_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "torchjd",
        "torchjd.autojac",
        "torchjd.aggregation",
        "torch_rechub",
        "torch_rechub.basic",
        "torch_rechub.basic.metaoptimizer",
    ):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_peer_status_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_peers(monkeypatch)
    status = peers.peer_status()
    for key in ("torchjd", "rechub"):
        assert status[key]["available"] is False
        assert ".[bench]" in status[key]["reason"]


def test_bench_runs_without_peers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hide_peers(monkeypatch)
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    args = parser.parse_args(
        [
            "--quick",
            "--out",
            str(tmp_path),
            "--sections",
            "param,h2h",
            "--tasks",
            "2",
            "--memory",
            "none",
            "--balancers",
            "equal,mgda",
            "--lambda-steps",
            "2",
            "--no-plots",
        ]
    )
    assert cli.run(args) == 0
    err = capsys.readouterr().err
    assert "install" in err.lower() and ".[bench]" in err
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert res["peers"]["torchjd"]["available"] is False
    modes = {r["mode"] for s in res["sections"].values() for r in s["results"]}
    assert modes == {"plain", "param:equal", "param:mgda", "rep:mgda"}
    assert res["mgda_agreement"]["available"] is False
    torchjd_item = [b for b in res["budget"] if "TorchJD" in b["item"]]
    assert torchjd_item and torchjd_item[0]["met"] is None
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "torchjd not available" in md


def test_device_cuda_without_cuda_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "never"
    assert cli.main(["--device", "cuda", "--quick", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --device cuda: CUDA is not available" in err
    assert "Traceback" not in err
    assert not out.exists()  # failed before building or writing anything
    with pytest.raises(ValueError, match="CUDA is not available"):
        options.check_device("cuda:0")
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        options.check_device("tpu")
    assert options.check_device("cpu") == "cpu"
    # through the dispatcher too
    from experiments.cli import main as cli_main

    assert cli_main(["bench", "--device", "cuda", "--quick", "--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cuda_paths_with_stubbed_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-only plumbing (device check, synchronizing clock, in-process peak memory, GPU
    budget lines, markdown) run on the CPU with torch.cuda's sync and memory functions stubbed:
    checks the wiring, not any number."""
    calls = {"sync": 0, "reset": 0, "peak": 0}

    def sync(device: Any = None) -> None:
        calls["sync"] += 1

    def reset(device: Any = None) -> None:
        calls["reset"] += 1

    def peak(device: Any = None) -> int:
        calls["peak"] += 1
        return (100 + 10 * calls["peak"]) * 2**20  # plain 110 MB, the next mode 120 MB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert options.check_device("cuda") == "cuda"
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        options.check_device("cuda:3")
    clock = device_clock("cuda")
    n = calls["sync"]
    assert clock() > 0 and calls["sync"] == n + 1

    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    argv = "--quick --sections rep --tasks 2 --balancers mgda --no-diagnostics --no-peers "
    argv += "--memory-modes rep/plain,rep/rep:mgda --memory-steps 1"
    args = options.resolve(parser.parse_args(argv.split()))
    cfg = options.model_config(args)  # built on the CPU: only torch.cuda's functions are stubbed
    data = run_section("rep", args, cfg, peers.peer_status(), lambda **_: NullBar())
    sections = {"rep": data}
    run_memory_cuda(sections, args, cfg, lambda **_: NullBar())
    assert calls["reset"] == 2 and calls["peak"] == 2  # once per mode, before/after its steps
    assert data["memory"]["source"] == "torch.cuda.max_memory_allocated"
    rows = {r["mode"]: r for r in data["results"] if r["K"] == 2}
    assert rows["plain"]["cuda_peak_mb"] == 110 and rows["plain"]["cuda_peak_ratio"] == 1.0
    assert rows["rep:mgda"]["cuda_peak_ratio"] == pytest.approx(120 / 110)
    assert rows["rep:mgda"]["cuda_step_mb"] == 20 and rows["rep:mgda"]["cuda_step_ratio"] == 2.0
    assert "rss_mb" not in rows["plain"]

    args.device = "cuda"  # the report as a CUDA run would write it
    derived = derived_tables(sections, args)
    budget = budget_table(sections, derived, {"available": False, "reason": "-"}, args)
    items = {b["item"]: b for b in budget}
    gpu = [i for i in items if i.startswith("on Fake GPU: representation-level")]
    assert gpu and items[gpu[0]]["met"] is (rows["rep:mgda"]["ratio"] <= 1.10)
    assert (
        "on Fake GPU: exact parameter-level MGDA vs TorchJD mtl_backward + MGDA, same model"
        in items
    )
    assert "max_memory_allocated" in items["peak memory, representation level vs plain"]["measured"]
    assert any(i.startswith("CUDA overhead section") for i in items)
    results = {
        "meta": {
            "command": "python -m experiments bench --device cuda",
            "device": "cuda",
            "machine": {
                "summary": "test",
                "device_summary": "cuda: Fake GPU",
                "loadavg_before": "0",
                "loadavg_after": "0",
            },
            "elapsed_s": 1.0,
            "model": cfg.to_dict(),
        },
        "peers": peers.peer_status(),
        "sections": sections,
        "derived": derived,
        "marigold_lambda": {},
        "mgda_agreement": {"available": False, "reason": "-"},
        "budget": budget,
    }
    md = render_markdown(results)
    assert "| peak CUDA MB | CUDA mem ratio |" in md and "Device: cuda: Fake GPU" in md
    assert "torch.cuda.synchronize()" in md


def test_gpu_model_flags_resolve_together() -> None:
    """The issue's GPU model is reachable by flags (not run here: 8 x 1M x 32 tables)."""
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    argv = "--fields 8 --rows 1000000 --dim 32 --bottom 1024,512,256 --tower 64 "
    argv += "--batch-size 4096 --tasks 4,16"
    args = options.resolve(parser.parse_args(argv.split()))
    cfg = options.model_config(args)
    assert (cfg.fields, cfg.dim, cfg.bottom, cfg.tower, cfg.batch_size) == (
        8,
        32,
        (1024, 512, 256),
        (64,),
        4096,
    )
    assert args.rows == 1_000_000 and args.tasks == [4, 16] and args.device == "cpu"
    assert args.memory_tasks == 16 and args.h2h_tasks == [4]
    assert args.sections == ["rep", "param", "h2h", "overhead"]
    # the overhead section keeps its own small model whatever the main model's flags
    small = options.section_config("overhead", args, cfg)
    assert (small.fields, small.dim, small.bottom, small.batch_size) == (4, 8, (32, 16), 64)
    assert options.section_config("rep", args, cfg) is cfg


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert cli.main(["--quick", "--out", str(tmp_path), "--balancers", "nope", "--quiet"]) == 2
    assert cli.main(["--quick", "--out", str(tmp_path), "--sections", "x", "--quiet"]) == 2


def test_module_has_dispatch_pair() -> None:
    assert callable(cli.add_arguments) and callable(cli.run) and callable(cli.main)
    assert CombinedOptimizer.__mro__[1] is torch.optim.Optimizer


def test_package_imports_point_one_way() -> None:
    """experiments/bench/: module-level imports only, no cycle among the package's modules, and
    no import of another bench module hidden inside a function."""
    import ast

    root = Path(cli.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in sorted(root.glob("*.py")):
        name = path.stem
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            inside = [m.split(".")[2] for m in mods if m.startswith("experiments.bench.")]
            if inside and node.col_offset > 0 and name != "__main__":
                raise AssertionError(f"{path.name}:{node.lineno}: import inside a function")
            deps.update(m for m in inside if (root / f"{m}.py").exists())
        graph[name] = deps - {name}
    assert graph["__init__"] == set() and graph["model"] == set()
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, (*stack, name))
            done.add(name)

    for name in graph:
        visit(name, ())


# ---------------------------------------------------------------------- stage timing
def test_stage_timer_times_every_stage_and_restores_the_engine() -> None:
    originals = [
        owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        for owner, name, _ in stages.STAGES
    ]
    out = stages.step_stages("mgda", num_tasks=3, steps=2, warmup=1)
    # every stage of the representation-level step ran (the split-heads path: no sum_backward)
    for _, _, label in stages.STAGES:
        assert out[label] > 0.0, label
    assert out[stages.STEP_LABEL] > 0.0 and out["whole step"] >= out["whole backward()"]
    restored = [
        owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        for owner, name, _ in stages.STAGES
    ]
    assert all(a is b for a, b in zip(originals, restored))
    plain = stages.plain_stages(num_tasks=3, steps=2, warmup=1)
    assert set(plain) == {*stages.PLAIN_PARTS, "whole step"}


def test_stages_cli_prints_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert stages.main(["--tasks", "2", "--methods", "equal", "--steps", "2", "--warmup", "1"]) == 0
    table = capsys.readouterr().out
    assert "| stage (µs per step) | plain | equal |" in table
    assert "| graph analysis |" in table
