"""Tests for mtl.train: fit / evaluate on tiny data (a few seconds in all)."""

from __future__ import annotations

import math
import pickletools
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from balancers.registry import make_balancer
from mtl.models import build_model
from mtl.train import (
    CheckpointError,
    CheckpointOptions,
    EvalOptions,
    FitKeywords,
    LogOptions,
    TrainOptions,
    TrainResult,
    _make_closure,
    evaluate,
    fit,
    selection_score,
    task_loss_fns,
)
from tasks import DataSplits, FeatureSchema, TabularDataset, TaskSpec, make_synthetic

TINY_MODEL = {"num_experts": 2, "expert_dims": (8,), "tower_dims": (4,)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run fastest on one thread (and do not stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth() -> DataSplits:
    return make_synthetic(num_samples=256, n_valid=64, n_test=64, dim=8, num_sin=2, seed=0)


def _model(splits: DataSplits, seed: int = 0, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mmoe", **splits.model_kwargs(), **{**TINY_MODEL, **kw})


def _opt(model: torch.nn.Module, name: str = "equal", k: int = 2, lr: float = 1e-2, **kw: Any):
    return make_balancer(name, torch.optim.Adam(model.parameters(), lr=lr), k, **kw)


def _mixed_splits(n: int = 120, seed: int = 0) -> DataSplits:
    """One binary and one regression task, numeric + categorical features."""
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(n, 3, generator=g)
    x_cat = torch.randint(0, 4, (n, 1), generator=g)
    y_bin = (x_num[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).float()
    y_reg = x_num[:, 1] * 2 + 0.1 * torch.randn(n, generator=g)
    schema = FeatureSchema(["a", "b", "c"], ["cat"], [4])
    tasks = [TaskSpec("click", "binary"), TaskSpec("watch", "regression")]
    full = TabularDataset(x_num, x_cat, torch.stack([y_bin, y_reg], 1), schema, tasks)
    return DataSplits(
        full.subset(slice(0, 80)), full.subset(slice(80, 100)), full.subset(slice(100, n)), "mixed"
    )


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- basics
def test_fit_reduces_loss_and_reports(synth: DataSplits) -> None:
    model = _model(synth)
    res = fit(model, synth, _opt(model), epochs=6, batch_size=32, progress=False)
    assert isinstance(res, TrainResult)
    assert res.epochs == 6 and res.steps == 6 * 8 and len(res.history) == 6
    for task in ("task0", "task1"):
        assert res.history[-1]["train_loss"][task] < 0.7 * res.history[0]["train_loss"][task]
    assert set(res.test_metrics) == {"task0", "task1"}
    assert set(res.test_metrics["task0"]) == {"mse"}
    assert res.step_time_s > 0 and res.iter_time_s >= res.step_time_s
    assert res.weights_mean == [1.0, 1.0]
    assert res.best_epoch is not None and 1 <= res.best_epoch <= 6
    h = res.history[0]
    assert {"epoch", "step", "train_loss", "weights_mean", "step_time_s", "valid", "score"} <= set(
        h
    )
    d = res.to_dict()
    assert d["steps"] == res.steps and len(d["history"]) == 6


def test_fit_mgda_parameter_level(synth: DataSplits) -> None:
    model = _model(synth)
    res = fit(model, synth, _opt(model, "mgda"), level="parameters", epochs=2, batch_size=64,
              progress=False)  # fmt: skip
    assert res.steps == 8
    assert abs(sum(res.weights_mean) - 1.0) < 1e-9  # MGDA weights lie on the simplex


@pytest.mark.parametrize("level", ["representation", "parameters"])
def test_fit_marigold_gets_a_closure(synth: DataSplits, level: str) -> None:
    model = _model(synth, dropout=0.2)
    opt = _opt(model, "marigold")
    calls: list[int] = []
    res = fit(model, synth, opt, level=level, epochs=1, batch_size=64, progress=False,
              on_step=lambda step, info: calls.append(info.extras["closure_calls"]))  # fmt: skip
    assert res.steps == 4 and calls == [1, 1, 1, 1]
    assert res.weights_mean != [0.5, 0.5]  # the weights moved


def test_representation_closure_replays_the_forward(synth: DataSplits) -> None:
    """closure(z) re-runs the heads on z (same dropout masks); closure(z + d) moves the losses."""
    model = _model(synth, dropout=0.3)
    model.train()
    fns = task_loss_fns(synth.tasks)
    features, targets = next(synth.train.batches(32))
    rng = (torch.get_rng_state(), [])
    out = model(features)
    losses = [fn(o, y) for fn, o, y in zip(fns, out.task_outputs, targets)]
    kinds = [t.kind for t in synth.tasks]
    args = (features, targets, fns, kinds, None, rng, [])
    closure = _make_closure("representation", model, out, *args)
    with torch.no_grad():
        same = closure(out.representation.detach())
        shifted = closure(out.representation.detach() + 0.5)
    for a, b in zip(losses, same):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(losses, shifted))
    pclosure = _make_closure("parameters", model, out, *args)
    with torch.no_grad():
        again = pclosure()
    for a, b in zip(losses, again):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluate_keys_binary_and_regression() -> None:
    splits = _mixed_splits()
    model = build_model("shared_bottom", **splits.model_kwargs(), bottom_dims=(8,))
    m = evaluate(model, splits.test, batch_size=7)
    assert set(m) == {"click", "watch"}
    assert set(m["click"]) == {"auc", "log_loss", "ne"}
    assert set(m["watch"]) == {"mse"}
    assert all(math.isfinite(v) for v in m["click"].values())
    assert model.training  # mode restored
    # a single-class split: AUC and NE are undefined (NaN), log loss is still reported
    one = splits.test.subset(splits.test.y[:, 0] == 1)
    m1 = evaluate(model, one)
    assert math.isnan(m1["click"]["auc"]) and math.isfinite(m1["click"]["log_loss"])


def test_fit_mixed_tasks_uses_bce_and_mse() -> None:
    splits = _mixed_splits()
    torch.manual_seed(0)
    model = build_model("mmoe", **splits.model_kwargs(), **TINY_MODEL)
    res = fit(model, splits, _opt(model, "mgda"), epochs=3, batch_size=16, progress=False)
    assert set(res.valid_metrics["click"]) == {"auc", "log_loss", "ne"}
    fns = task_loss_fns(splits.tasks)
    logits = torch.tensor([0.0, 2.0])
    y = torch.tensor([1.0, 0.0])
    assert torch.allclose(
        fns[0](logits, y), torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    )
    assert torch.allclose(fns[1](logits, y), torch.nn.functional.mse_loss(logits, y))


def test_selection_score() -> None:
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "regression")]
    m = {"a": {"auc": 0.8, "log_loss": 0.4, "ne": 0.9}, "b": {"mse": 0.2}}
    assert selection_score(m, tasks) == pytest.approx((0.8 - 0.2) / 2)
    assert selection_score(m, tasks, "b/mse") == pytest.approx(-0.2)
    assert selection_score(m, tasks, "ne") == pytest.approx(-0.9)
    assert selection_score(m, tasks, lambda mm: mm["a"]["auc"]) == 0.8
    with pytest.raises(ValueError, match="selection metric"):
        selection_score(m, tasks, "c/auc")


# ----------------------------------------------------------------------------- control
def test_early_stopping_and_restore_best(synth: DataSplits) -> None:
    scores = iter([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    model = _model(synth)
    res = fit(model, synth, _opt(model), epochs=10, batch_size=64, early_stopping_patience=2,
              selection_metric=lambda _m: next(scores), progress=False)  # fmt: skip
    assert res.stopped_early and res.epochs == 3
    assert res.best_epoch == 1 and res.best_score == 3.0
    # the restored state is the state after epoch 1
    ref = _model(synth)
    fit(ref, synth, _opt(ref), epochs=1, batch_size=64, progress=False)
    assert _same(_params(model), _params(ref))


def test_eval_every_and_max_steps(synth: DataSplits) -> None:
    model = _model(synth)
    seen: list[int] = []
    res = fit(model, synth, _opt(model), epochs=4, batch_size=64, eval_every=3, max_steps=6,
              on_step=lambda step, info: seen.append(step), progress=False)  # fmt: skip
    assert res.steps == 6 and seen == list(range(1, 7)) and res.epochs == 1
    assert "valid" not in res.history[0]  # epoch 1 not evaluated (eval_every=3)
    assert res.history[-1].get("partial") is True and "valid" in res.history[-1]


def test_before_backward_sees_live_losses_and_runs_probes(synth: DataSplits) -> None:
    """The pre-backward callback gets the step number on_step gets next, the K losses with their
    graph alive (a parameter-level probe works) and the model output; training is unchanged."""
    from mtl.conflict import ConflictTracker

    model = _model(synth)
    tracker = ConflictTracker(every=2, param_level_every=2)
    before: list[int] = []
    after: list[int] = []

    def probe(step: int, losses: list[torch.Tensor], out: Any) -> None:
        before.append(step)
        assert len(losses) == 2 and all(loss.requires_grad for loss in losses)
        assert out.representation.requires_grad
        tracker.update_parameter_level(step, losses, model.shared_parameters())

    res = fit(model, synth, _opt(model, "mgda"), epochs=3, batch_size=64, max_steps=5,
              before_backward=probe, on_step=lambda s, info: (after.append(s),
              tracker.update(s, info)), progress=False)  # fmt: skip
    assert before == after == [1, 2, 3, 4, 5] and res.steps == 5
    assert tracker.num_probes == 2  # steps 2 and 4
    probes = tracker.records("probe")
    assert all(r["level"] == "parameters" and math.isfinite(r["cos[task0,task1]"]) for r in probes)
    # the probe does not change training
    ref = _model(synth)
    fit(ref, synth, _opt(ref, "mgda"), epochs=3, batch_size=64, max_steps=5, progress=False)
    assert _same(_params(model), _params(ref))


def test_fit_is_quiet(synth: DataSplits, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(synth)
    fit(model, synth, _opt(model), epochs=1, batch_size=64, progress=False)
    fit(model, synth, _opt(model), epochs=1, batch_size=64)  # not a TTY: no bar
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_regularizer_hook(synth: DataSplits) -> None:
    calls = []

    def doubled(model, features, targets, loss_fns):  # noqa: ANN001, ANN202
        calls.append(1)
        out = model(features)
        return [2 * fn(o, y) for fn, o, y in zip(loss_fns, out.task_outputs, targets)]

    def with_output(model, features, targets, loss_fns):  # noqa: ANN001, ANN202
        out = model(features)
        return [fn(o, y) for fn, o, y in zip(loss_fns, out.task_outputs, targets)], out

    model = _model(synth)
    res = fit(model, synth, _opt(model), epochs=1, batch_size=64, regularizer=doubled,
              progress=False)  # fmt: skip
    assert len(calls) == 4 and res.steps == 4
    plain = _model(synth)
    ref = fit(plain, synth, _opt(plain), epochs=1, batch_size=64, progress=False)
    assert res.history[0]["train_loss"]["task0"] == pytest.approx(
        2 * ref.history[0]["train_loss"]["task0"], rel=0.2
    )
    model2 = _model(synth)
    fit(model2, synth, _opt(model2, "mgda"), epochs=1, batch_size=64, regularizer=with_output,
        progress=False)  # fmt: skip


def test_bad_arguments(synth: DataSplits) -> None:
    model = _model(synth)
    with pytest.raises(ValueError, match="level"):
        fit(model, synth, _opt(model), level="heads", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checkpoint_path"):
        fit(model, synth, _opt(model), resume=True, progress=False)
    with pytest.raises(TypeError, match="BalancedOptimizer"):
        fit(model, synth, torch.optim.Adam(model.parameters()), progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tasks"):
        fit(model, synth, _opt(model, k=3), progress=False)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("balancer", ["multibalance", "pcgrad"])
def test_resume_matches_uninterrupted_run(synth: DataSplits, tmp_path: Any, balancer: str) -> None:
    kw = {"batch_size": 48, "progress": False, "restore_best": False, "seed": 3}
    full_model = _model(synth, dropout=0.2)
    full = fit(full_model, synth, _opt(full_model, balancer), epochs=4, **kw)

    ckpt = tmp_path / "ckpt.pt"
    first = _model(synth, dropout=0.2)
    fit(first, synth, _opt(first, balancer), epochs=2, checkpoint_path=ckpt, **kw)
    assert ckpt.exists()
    # a fresh model and optimizer (different init) continue from the checkpoint
    second = _model(synth, seed=99, dropout=0.2)
    res = fit(second, synth, _opt(second, balancer), epochs=4, checkpoint_path=ckpt, resume=True,
              **kw)  # fmt: skip
    assert _same(_params(second), _params(full_model))
    assert res.steps == full.steps and res.epochs == 4
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in full.history]
    assert res.best_epoch == full.best_epoch


def test_resume_mid_epoch(synth: DataSplits, tmp_path: Any) -> None:
    kw = {"batch_size": 40, "progress": False, "restore_best": False}
    full_model = _model(synth)
    fit(full_model, synth, _opt(full_model, "mgda"), epochs=3, **kw)
    ckpt = tmp_path / "mid.pt"
    part = _model(synth)
    r1 = fit(part, synth, _opt(part, "mgda"), epochs=3, max_steps=10, checkpoint_path=ckpt, **kw)
    assert r1.steps == 10 and r1.history[-1].get("partial")
    cont = _model(synth, seed=5)
    r2 = fit(cont, synth, _opt(cont, "mgda"), epochs=3, checkpoint_path=ckpt, resume=True, **kw)
    assert r2.steps == 3 * 7
    assert not any(h.get("partial") for h in r2.history) and len(r2.history) == 3
    assert _same(_params(cont), _params(full_model))


def test_resume_checks_settings(synth: DataSplits, tmp_path: Any) -> None:
    ckpt = tmp_path / "c.pt"
    m = _model(synth)
    fit(m, synth, _opt(m), epochs=1, batch_size=64, checkpoint_path=ckpt, progress=False)
    m2 = _model(synth)
    with pytest.raises(ValueError, match="batch_size"):
        fit(m2, synth, _opt(m2), epochs=2, batch_size=32, checkpoint_path=ckpt, resume=True,
            progress=False)  # fmt: skip
    # resume=True without an existing checkpoint starts fresh
    m3 = _model(synth)
    res = fit(m3, synth, _opt(m3), epochs=1, batch_size=64, checkpoint_path=tmp_path / "new.pt",
              resume=True, progress=False)  # fmt: skip
    assert res.epochs == 1 and (tmp_path / "new.pt").exists()


def test_resume_with_scheduler(synth: DataSplits, tmp_path: Any) -> None:
    kw = {"batch_size": 64, "progress": False, "restore_best": False}

    def setup(seed: int = 0) -> tuple[Any, Any, Any]:
        model = _model(synth, seed=seed)
        opt = _opt(model, "mgda")
        return model, opt, torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)

    m1, o1, s1 = setup()
    full = fit(m1, synth, o1, epochs=3, scheduler=s1, **kw)
    assert [h["lr"] for h in full.history] == [1e-2, 5e-3, 2.5e-3]
    ckpt = tmp_path / "s.pt"
    m2, o2, s2 = setup()
    fit(m2, synth, o2, epochs=1, scheduler=s2, checkpoint_path=ckpt, **kw)
    m3, o3, s3 = setup(seed=7)
    res = fit(m3, synth, o3, epochs=3, scheduler=s3, checkpoint_path=ckpt, resume=True, **kw)
    assert [h["lr"] for h in res.history] == [1e-2, 5e-3, 2.5e-3]
    assert _same(_params(m3), _params(m1))


@pytest.mark.parametrize("balancer", ["mgda", "marigold"])
def test_resume_with_a_perturbation_regularizer(
    synth: DataSplits, tmp_path: Any, balancer: str
) -> None:
    """LSPR's noise generator is checkpointed: a resumed run is bit-identical."""
    from balancers import LSPR

    kw = {"batch_size": 48, "progress": False, "restore_best": False, "seed": 4}
    full_model = _model(synth, dropout=0.2)
    fit(full_model, synth, _opt(full_model, balancer), epochs=3,
        regularizer=LSPR(epsilon=0.1, seed=7), **kw)  # fmt: skip
    ckpt = tmp_path / "reg.pt"
    first = _model(synth, dropout=0.2)
    fit(first, synth, _opt(first, balancer), epochs=1, checkpoint_path=ckpt,
        regularizer=LSPR(epsilon=0.1, seed=7), **kw)  # fmt: skip
    second = _model(synth, seed=99, dropout=0.2)
    fit(second, synth, _opt(second, balancer), epochs=3, checkpoint_path=ckpt, resume=True,
        regularizer=LSPR(epsilon=0.1, seed=123), **kw)  # fmt: skip
    assert _same(_params(second), _params(full_model))


# ----------------------------------------------------------------------------- safe resume
def _write_marker(path: str) -> str:
    """What a crafted checkpoint would run on load (stands in for ``os.system``)."""
    Path(path).write_text("code from the checkpoint ran")
    return path


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_write_marker, (self.marker,))


def _checkpoint(synth: DataSplits, path: Path, **kw: Any) -> None:
    m = _model(synth)
    fit(m, synth, _opt(m), epochs=1, batch_size=64, checkpoint_path=path, progress=False, **kw)


def _resume(synth: DataSplits, path: Path) -> TrainResult:
    m = _model(synth)
    return fit(m, synth, _opt(m), epochs=2, batch_size=64, checkpoint_path=path, resume=True,
               progress=False)  # fmt: skip


def test_resume_never_runs_code_from_the_checkpoint(synth: DataSplits, tmp_path: Path) -> None:
    """A checkpoint whose pickle calls a function on load (``__reduce__``) is refused, and the
    function never runs."""
    ckpt = tmp_path / "evil.pt"
    _checkpoint(synth, ckpt)
    payload = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "marker"
    payload["history"].append({"note": _Exploit(marker)})
    torch.save(payload, ckpt)
    with pytest.raises(CheckpointError, match="refusing") as err:
        _resume(synth, ckpt)
    assert str(ckpt) in str(err.value)
    assert not marker.exists()
    # the crafted file is live: an unrestricted load runs its code
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_names_the_file(synth: DataSplits, tmp_path: Path) -> None:
    ckpt = tmp_path / "trunc.pt"
    _checkpoint(synth, ckpt)
    data = ckpt.read_bytes()
    for size in (len(data) // 2, 10, 0):
        ckpt.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as err:
            _resume(synth, ckpt)
        assert str(ckpt) in str(err.value)


def test_old_format_checkpoint_gives_a_clear_error(synth: DataSplits, tmp_path: Path) -> None:
    """Format 1 pickled NumPy's RNG state (an ndarray): a weights-only load refuses it."""
    ckpt = tmp_path / "v1.pt"
    _checkpoint(synth, ckpt)
    payload = torch.load(ckpt, weights_only=True)
    payload["version"] = 1
    payload["rng"]["numpy"] = np.random.get_state()  # noqa: NPY002 - what format 1 stored
    torch.save(payload, ckpt)
    with pytest.raises(CheckpointError, match="format 2") as err:
        _resume(synth, ckpt)
    assert str(ckpt) in str(err.value)
    payload["rng"]["numpy"] = None
    torch.save(payload, ckpt)
    with pytest.raises(CheckpointError, match="version 1") as err:
        _resume(synth, ckpt)
    assert str(ckpt) in str(err.value)


#: what torch 2.4's weights-only unpickler (the oldest torch supported) understands
_TORCH24_OPCODES = {
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE",
    "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT",
    "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT",
    "LONG_BINPUT", "LONG1", "PROTO", "STOP",
}  # fmt: skip


@pytest.mark.parametrize("balancer", ["marigold", "pcgrad"])
def test_checkpoint_holds_only_plain_values(
    synth: DataSplits, tmp_path: Path, balancer: str
) -> None:
    """Only tensors, numbers, strings and containers: no NumPy or builtins globals, and only
    opcodes that torch 2.4's weights-only loader reads (balancers with NumPy generators and an
    LSPR regularizer included)."""
    from balancers import LSPR

    ckpt = tmp_path / "plain.pt"
    m = _model(synth)
    fit(m, synth, _opt(m, balancer), epochs=1, batch_size=64, max_steps=3, checkpoint_path=ckpt,
        regularizer=LSPR(epsilon=0.1), progress=False)  # fmt: skip
    with zipfile.ZipFile(ckpt) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    assert {op.name for op, _, _ in ops} <= _TORCH24_OPCODES
    names = {str(arg) for op, arg, _ in ops if op.name == "GLOBAL"}
    assert all(n.startswith("torch") or n == "collections OrderedDict" for n in names), names
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_crash_while_writing_keeps_the_previous_checkpoint(
    synth: DataSplits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtl.train import _checkpoint as ck

    ckpt = tmp_path / "keep.pt"
    _checkpoint(synth, ckpt)
    before = ckpt.read_bytes()

    def crash(_payload: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _resume(synth, ckpt)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]  # no temporary left
    assert _resume(synth, ckpt).epochs == 2


def test_to_plain_converts_numpy_and_refuses_objects() -> None:
    from mtl.train._checkpoint import to_plain

    state = {"a": np.float64(1.5), "b": np.arange(3), "c": [np.int64(2), "x"], "d": (None,)}
    plain = to_plain(state, "optimizer")
    assert type(plain["a"]) is float and plain["c"] == [2, "x"] and plain["d"] == (None,)
    assert isinstance(plain["b"], torch.Tensor) and plain["b"].tolist() == [0, 1, 2]
    unchanged = {"t": torch.zeros(2), "n": [1, 2.0, "s", None, True]}
    assert to_plain(unchanged, "x") is unchanged
    with pytest.raises(TypeError, match=r"optimizer\['e'\]\[0\]"):
        to_plain({"e": [object()]}, "optimizer")


# ----------------------------------------------------------------------------- options
def test_option_dataclasses_match_the_keywords(synth: DataSplits, tmp_path: Path) -> None:
    """The dataclasses and the historical keywords are two spellings of the same run."""
    from mtl.train._options import KEYWORDS

    assert set(KEYWORDS) == set(FitKeywords.__annotations__) and len(KEYWORDS) == 23
    kw = {"epochs": 2, "batch_size": 48, "seed": 2, "eval_every": 2, "progress": False}
    m1 = _model(synth)
    r1 = fit(m1, synth, _opt(m1, "mgda"), checkpoint_path=tmp_path / "a.pt", **kw)
    m2 = _model(synth)
    r2 = fit(m2, synth, _opt(m2, "mgda"), train=TrainOptions(epochs=2, batch_size=48, seed=2),
             evaluation=EvalOptions(eval_every=2), log=LogOptions(progress=False),
             checkpoint=CheckpointOptions(path=tmp_path / "b.pt"))  # fmt: skip
    assert _same(_params(m1), _params(m2)) and r1.steps == r2.steps
    assert (tmp_path / "b.pt").exists()
    # a keyword overrides the field of a dataclass given alongside
    m3 = _model(synth)
    r3 = fit(m3, synth, _opt(m3), train=TrainOptions(epochs=5, batch_size=64), epochs=1,
             progress=False)  # fmt: skip
    assert r3.epochs == 1 and r3.steps == 4
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        fit(m3, synth, _opt(m3), epoch=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="TrainOptions"):
        fit(m3, synth, _opt(m3), train=EvalOptions())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checkpoint_every"):
        CheckpointOptions(path="x.pt", every=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainOptions(epochs=-1)


def test_closure_follows_the_class_flag(synth: DataSplits) -> None:
    """``needs_closure`` on the optimizer's class, not its signature, makes fit pass closure=."""
    from balancers import EqualWeight

    class WithClosure(EqualWeight):
        needs_closure: ClassVar[bool] = True
        seen: ClassVar[list[bool]] = []

        def backward(self, losses: Any, *, closure: Any = None, **kw: Any) -> Any:
            type(self).seen.append(callable(closure))
            return super().backward(losses, **kw)

    m = _model(synth)
    fit(m, synth, WithClosure(torch.optim.Adam(m.parameters()), 2), epochs=1, batch_size=64,
        progress=False)  # fmt: skip
    assert WithClosure.seen == [True] * 4
    WithClosure.seen.clear()
    fit(m, synth, WithClosure(torch.optim.Adam(m.parameters()), 2), epochs=1, batch_size=64,
        use_closure=False, progress=False)  # fmt: skip
    assert WithClosure.seen == [False] * 4


def test_user_perturbation_regularizer_is_recognised_by_its_class_flag(
    synth: DataSplits,
) -> None:
    class Scaled:
        """A user-written perturbation regularizer: losses at 1.5 z."""

        perturbs_representation: ClassVar[bool] = True

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, z: Any, heads: Any, targets: Any, loss_fns: Any, **_: Any) -> Any:
            self.calls += 1
            return [fn(o, y) for fn, o, y in zip(loss_fns, heads(1.5 * z), targets)]

        def closure(self, heads: Any, targets: Any, loss_fns: Any, **_: Any) -> Any:
            return lambda z: self(z, heads, targets, loss_fns)

        def state_dict(self) -> dict[str, Any]:
            return {"calls": self.calls}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            self.calls = int(sd["calls"])

    reg = Scaled()
    m = _model(synth)
    res = fit(m, synth, _opt(m), epochs=1, batch_size=64, regularizer=reg, progress=False)
    assert reg.calls == 4 and res.steps == 4
