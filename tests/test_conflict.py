"""Tests for mtl.conflict: Gram-matrix metrics on hand-built gradients, and the ConflictTracker."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from torch import nn

from mtl import BalanceInfo
from mtl.conflict import (
    ConflictTracker,
    aligned_condition_number,
    condition_number,
    conflict_rate,
    cosine_matrix,
    magnitude_similarity,
    magnitude_similarity_summary,
    pair_values,
    record_columns,
    summarize,
    task_norms,
    update_cosines,
    update_norm,
)

D64 = torch.float64


def gram(*rows: Any) -> torch.Tensor:
    g = torch.stack([torch.as_tensor(r, dtype=D64) for r in rows])
    return g @ g.T


def rand_g(k: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=D64)


# ---------------------------------------------------------------------- hand-built cases
def test_orthogonal_gradients() -> None:
    m = gram([1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0])
    torch.testing.assert_close(task_norms(m), torch.tensor([1.0, 2.0, 3.0], dtype=D64))
    torch.testing.assert_close(cosine_matrix(m), torch.eye(3, dtype=D64))
    assert conflict_rate(m) == 0.0
    assert condition_number(m) == pytest.approx(3.0)
    assert aligned_condition_number(m) == pytest.approx(3.0)
    gms = magnitude_similarity(m)
    assert gms[0, 1] == pytest.approx(2 * 1 * 2 / (1 + 4))
    assert gms[1, 2] == pytest.approx(2 * 2 * 3 / (4 + 9))


def test_opposite_gradients() -> None:
    g = [1.0, -2.0, 0.5]
    m = gram(g, [-x for x in g])
    torch.testing.assert_close(
        cosine_matrix(m), torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=D64)
    )
    assert conflict_rate(m) == 1.0
    assert condition_number(m) == math.inf  # g and -g are dependent
    s = summarize(m)
    assert s["num_conflicting_pairs"] == 1 and s["min_cosine"] == -1.0


@pytest.mark.parametrize("s", [0.1, 0.5, 2.0, 3.0, 1e3, -4.0])
def test_scaled_copies(s: float) -> None:
    g = rand_g(1, 7)[0]
    m = gram(g, s * g)
    expected_cos = 1.0 if s > 0 else -1.0
    assert cosine_matrix(m)[0, 1] == pytest.approx(expected_cos)
    assert conflict_rate(m) == (0.0 if s > 0 else 1.0)
    a = abs(s)
    assert magnitude_similarity(m)[0, 1] == pytest.approx(2 * a / (1 + a * a))
    assert magnitude_similarity_summary(m)["min"] == pytest.approx(2 * a / (1 + a * a))
    assert condition_number(m) == math.inf
    assert aligned_condition_number(m) == pytest.approx(1.0)


def test_equal_copies_have_unit_magnitude_similarity() -> None:
    g = rand_g(1, 5)[0]
    m = gram(g, g, g)
    torch.testing.assert_close(magnitude_similarity(m), torch.ones(3, 3, dtype=D64))
    assert condition_number(m) == math.inf


def test_zero_gradient_gives_finite_documented_values() -> None:
    m = gram([1.0, 2.0], [0.0, 0.0], [-1.0, 0.5])
    cos = cosine_matrix(m)
    assert bool(torch.isfinite(cos).all())
    assert cos[1].tolist() == [0.0, 0.0, 0.0] and cos[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert cos[0, 0] == 1.0 and cos[2, 2] == 1.0
    gms = magnitude_similarity(m)
    assert gms[0, 1] == 0.0 and gms[1, 2] == 0.0 and gms[1, 1] == 1.0
    # pairs: (0,1) zero task -> 0; (0,2): cos(-1+1) = 0 -> no conflict; (1,2) zero task
    assert conflict_rate(m) == 0.0
    assert condition_number(m) == math.inf
    assert math.isfinite(aligned_condition_number(m))
    uc = update_cosines(m, torch.tensor([1.0, 1.0, 1.0]))
    assert bool(torch.isfinite(uc).all()) and uc[1] == 0.0
    s = summarize(m, torch.tensor([1.0, 1.0, 1.0]))
    json.dumps(s)  # plain values (condition_number is inf: json writes Infinity)


def test_all_zero_gradients() -> None:
    m = torch.zeros(3, 3, dtype=D64)
    assert task_norms(m).tolist() == [0.0] * 3
    assert cosine_matrix(m).abs().sum() == 0.0
    torch.testing.assert_close(magnitude_similarity(m), torch.ones(3, 3, dtype=D64))
    assert conflict_rate(m) == 0.0
    assert condition_number(m) == math.inf
    assert aligned_condition_number(m) == 1.0
    assert update_cosines(m, torch.ones(3)).tolist() == [0.0] * 3
    assert update_norm(m, torch.ones(3)) == 0.0


def test_single_task_pair_statistics_are_nan() -> None:
    m = torch.tensor([[4.0]], dtype=D64)
    assert math.isnan(conflict_rate(m))
    assert math.isnan(magnitude_similarity_summary(m)["mean"])
    s = summarize(m, torch.tensor([1.0]))
    assert math.isnan(s["min_cosine"]) and s["condition_number"] == 1.0
    assert s["update_cosines"] == [1.0]


def test_update_cosines_match_explicit_vectors() -> None:
    g = rand_g(4, 30, seed=1)
    c = torch.tensor([0.3, -0.2, 1.5, 0.0], dtype=D64)
    d = c @ g
    expected = torch.nn.functional.cosine_similarity(d.expand_as(g), g, dim=1)
    torch.testing.assert_close(update_cosines(g @ g.T, c), expected)
    assert update_norm(g @ g.T, c) == pytest.approx(float(d.norm()))


def test_update_cosines_per_block() -> None:
    blocks = [rand_g(3, 5, seed=2), rand_g(3, 8, seed=3)]
    c = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.1, 2.0]], dtype=D64)
    grams = torch.stack([b @ b.T for b in blocks])
    d = torch.cat([c[i] @ blocks[i] for i in range(2)])
    full = torch.cat(blocks, dim=1)
    expected = torch.nn.functional.cosine_similarity(d.expand_as(full), full, dim=1)
    torch.testing.assert_close(update_cosines(grams, c), expected)
    # shared (K,) coefficients over blocks == the summed Gram
    w = torch.tensor([0.2, 0.5, 0.3], dtype=D64)
    torch.testing.assert_close(update_cosines(grams, w), update_cosines(grams.sum(0), w))
    with pytest.raises(ValueError, match="per-block"):
        update_cosines(grams.sum(0), c)


def test_condition_numbers_against_svd() -> None:
    g = rand_g(3, 10, seed=4) * torch.tensor([[1.0], [5.0], [0.2]], dtype=D64)
    sv = torch.linalg.svdvals(g)
    assert condition_number(g @ g.T) == pytest.approx(float(sv[0] / sv[-1]), rel=1e-9)
    assert aligned_condition_number(g @ g.T) == pytest.approx(float(sv[0] / sv[-1]), rel=1e-9)
    # rank 2: the third gradient is a combination of the first two
    dep = torch.stack([g[0], g[1], 2.0 * g[0] - 3.0 * g[1]])
    sv = torch.linalg.svdvals(dep)
    assert condition_number(dep @ dep.T) == math.inf
    assert aligned_condition_number(dep @ dep.T) == pytest.approx(float(sv[0] / sv[1]), rel=1e-7)
    # K larger than the gradient dimension is rank-deficient
    wide = rand_g(4, 2, seed=5)
    assert condition_number(wide @ wide.T) == math.inf


def test_cosine_matrix_is_idempotent_and_accepts_numpy() -> None:
    g = rand_g(4, 6, seed=6)
    c = cosine_matrix(g @ g.T)
    torch.testing.assert_close(cosine_matrix(c), c)
    torch.testing.assert_close(cosine_matrix((g @ g.T).numpy()), c)  # type: ignore[arg-type]
    assert pair_values(c).shape == (6,)
    assert pair_values(c)[0] == c[0, 1] and pair_values(c)[-1] == c[2, 3]


def test_conflict_rate_tolerance() -> None:
    m = gram([1.0, 0.0], [-0.01, 1.0], [0.0, 1.0])
    assert conflict_rate(m) == pytest.approx(1 / 3)
    assert conflict_rate(m, tol=0.1) == 0.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="square"):
        cosine_matrix(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        condition_number(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        update_cosines(torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match="eps"):
        cosine_matrix(torch.eye(2), eps=-1.0)


@given(
    k=st.integers(1, 5),
    d=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-6, 6),
)
def test_metric_properties(k: int, d: int, seed: int, log_scale: float) -> None:
    g = rand_g(k, d, seed) * 10.0**log_scale
    m = g @ g.T
    cos = cosine_matrix(m)
    assert bool((cos.abs() <= 1).all()) and bool(torch.equal(cos, cos.T))
    gms = magnitude_similarity(m)
    assert bool(((gms >= 0) & (gms <= 1 + 1e-12)).all())
    # permutation equivariance and scale invariance
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(cosine_matrix(m[perm][:, perm]), cos[perm][:, perm])
    torch.testing.assert_close(cosine_matrix(m * 9.0), cos)
    c = torch.rand(k, generator=torch.Generator().manual_seed(seed + 1), dtype=D64)
    uc = update_cosines(m, c)
    expected = torch.nn.functional.cosine_similarity((c @ g).expand_as(g), g, dim=1)
    torch.testing.assert_close(uc, expected, atol=1e-7, rtol=1e-7)
    kappa = condition_number(m)
    assert kappa >= 1.0 - 1e-9
    assert aligned_condition_number(m) <= kappa * (1 + 1e-9)


# ---------------------------------------------------------------------- tracker (hand-built info)
def info_from(
    g: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    with_gram: bool = True,
    level: str = "representation",
    losses: torch.Tensor | None = None,
    skipped: bool = False,
) -> BalanceInfo:
    k = g.shape[0]
    return BalanceInfo(
        weights=torch.ones(k, dtype=D64) if weights is None else weights.to(D64),
        losses=torch.arange(1, k + 1, dtype=D64) if losses is None else losses,
        gram=(g @ g.T).to(D64) if with_gram else None,
        level=level,  # type: ignore[arg-type]
        skipped=skipped,
    )


def test_tracker_samples_every_n_and_records_contents() -> None:
    tr = ConflictTracker(every=3, task_names=["ctr", "cvr"])
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D64)
    w = torch.tensor([0.25, 0.75], dtype=D64)
    returned = [tr.update(step, info_from(g, w)) for step in range(10)]
    assert [r["step"] for r in tr.history] == [0, 3, 6, 9]
    assert [i for i, r in enumerate(returned) if r is not None] == [0, 3, 6, 9]
    assert tr.num_sampled == 4 and len(tr) == 4
    rec = tr.history[0]
    assert list(rec) == record_columns(["ctr", "cvr"])
    assert rec["source"] == "balance" and rec["level"] == "representation"
    assert rec["status"] == "ok"
    assert rec["cos[ctr,cvr]"] == pytest.approx(-1 / math.sqrt(2))
    assert rec["conflict_rate"] == 1.0
    assert rec["norm[ctr]"] == pytest.approx(1.0) and rec["norm[cvr]"] == pytest.approx(
        math.sqrt(2)
    )
    assert rec["weight[ctr]"] == 0.25 and rec["loss[cvr]"] == 2.0
    d = w @ g
    assert rec["update_cos[ctr]"] == pytest.approx(float(d @ g[0] / d.norm() / g[0].norm()))
    assert rec["update_norm"] == pytest.approx(float(d.norm()))
    assert rec["magnitude_similarity_min"] == pytest.approx(2 * math.sqrt(2) / 3)
    assert math.isfinite(rec["condition_number"])
    steps, vals = tr.series("conflict_rate")
    assert steps.tolist() == [0, 3, 6, 9] and vals.tolist() == [1.0] * 4


def test_tracker_conflict_tolerance_ignores_near_orthogonal_sign_noise() -> None:
    """cos = -0.01 (sign noise of nearly orthogonal tasks) and cos = -0.6 (a real conflict)."""
    g = torch.tensor([[1.0, 0.0, 0.0], [-0.01, 1.0, 0.0], [-0.6, 0.0, 0.8]], dtype=D64)
    plain = ConflictTracker(every=1, task_names=["a", "b", "c"])
    tolerant = ConflictTracker(every=1, task_names=["a", "b", "c"], conflict_tol=0.05)
    r0 = plain.update(0, info_from(g))
    r1 = tolerant.update(0, info_from(g))
    assert r0 is not None and r1 is not None
    assert r0["cos[a,b]"] == pytest.approx(-0.01 / math.hypot(0.01, 1.0))
    assert r1["cos[a,b]"] == r0["cos[a,b]"]  # cosines are recorded unchanged
    assert r0["conflict_rate"] == pytest.approx(3 / 3 - 1 / 3)  # (a,b) and (a,c) of 3 pairs
    assert r1["conflict_rate"] == pytest.approx(1 / 3)  # only (a,c)
    assert tolerant.state_dict()["conflict_tol"] == 0.05
    m = g @ g.T
    assert summarize(m, conflict_tol=0.05)["num_conflicting_pairs"] == 1
    assert summarize(m)["num_conflicting_pairs"] == 2
    with pytest.raises(ValueError, match="conflict_tol"):
        ConflictTracker(conflict_tol=1.5)
    with pytest.raises(TypeError, match="conflict_tol"):
        ConflictTracker(conflict_tol="0.1")  # type: ignore[arg-type]


def test_tracker_default_names_and_mismatch() -> None:
    tr = ConflictTracker(every=1)
    tr.update(0, info_from(rand_g(3, 4)))
    assert tr.task_names == ["task0", "task1", "task2"]
    with pytest.raises(ValueError, match="3 task names"):
        tr.update(1, info_from(rand_g(2, 4)))
    with pytest.raises(ValueError, match="positive int"):
        ConflictTracker(every=0)
    with pytest.raises(ValueError, match="unique"):
        ConflictTracker(task_names=["a", "a"])


def test_tracker_missing_gram_is_recorded_counted_and_warned_once() -> None:
    tr = ConflictTracker(every=2)
    g = rand_g(2, 3)
    with pytest.warns(RuntimeWarning, match="compute_gram=True"):
        tr.update(0, info_from(g, with_gram=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.update(1, info_from(g, with_gram=False))  # not sampled
        tr.update(2, info_from(g, with_gram=False))  # sampled, no second warning
    tr.update(4, info_from(g, skipped=True, losses=torch.tensor([math.nan, 1.0], dtype=D64)))
    tr.update(6, info_from(g))
    assert [r["status"] for r in tr.history] == ["no_gram", "no_gram", "skipped", "ok"]
    assert tr.num_no_gram == 2 and tr.num_skipped == 1 and tr.num_sampled == 4
    rec = tr.history[0]
    assert math.isnan(rec["conflict_rate"]) and math.isnan(rec["cos[task0,task1]"])
    assert rec["weight[task0]"] == 1.0  # weights are known even without a Gram
    s = tr.summary()
    assert s["num_sampled"] == 4 and s["num_ok"] == 1 and s["num_no_gram"] == 2
    assert s["num_skipped"] == 1


def test_tracker_per_block_weights_use_block_grams() -> None:
    blocks = [rand_g(2, 3, seed=7), rand_g(2, 4, seed=8)]
    bg = torch.stack([b @ b.T for b in blocks])
    w = torch.tensor([[1.0, 0.5], [0.2, 2.0]], dtype=D64)
    info = BalanceInfo(
        weights=w,
        losses=torch.ones(2, dtype=D64),
        gram=bg.sum(0),
        level="parameters",
        block_grams=bg,
    )
    tr = ConflictTracker(every=1)
    rec = tr.update(0, info)
    assert rec is not None
    assert rec["weight[task0]"] == pytest.approx(0.6)  # mean over blocks
    expected = update_cosines(bg, w)
    assert rec["update_cos[task1]"] == pytest.approx(float(expected[1]))


def _history_sequence() -> ConflictTracker:
    tr = ConflictTracker(every=1, task_names=["a", "b", "c"])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0]], dtype=D64)  # no conflict
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 0.2], [0.0, 1.0]], dtype=D64)
    tr.update(0, info_from(aligned))
    tr.update(1, info_from(conflicting, torch.tensor([1.0, 1.0, 4.0])))
    tr.update(2, info_from(aligned, with_gram=False))
    tr.update(3, info_from(conflicting))
    return tr


def test_tracker_summary() -> None:
    with pytest.warns(RuntimeWarning):
        tr = _history_sequence()
    s = tr.summary()
    assert s["num_sampled"] == 4 and s["num_ok"] == 3 and s["num_no_gram"] == 1
    # conflict rates: 0, 1/3, 1/3 -> mean 2/9; 2 of 3 recorded steps conflict
    assert s["mean_conflict_rate"] == pytest.approx(2 / 9)
    assert s["frac_steps_with_conflict"] == pytest.approx(2 / 3)
    assert s["frac_conflict[a,b]"] == pytest.approx(2 / 3)
    assert s["frac_conflict[a,c]"] == 0.0
    assert s["mean_weight[c]"] == pytest.approx((1 + 4 + 1 + 1) / 4)
    assert s["frac_rank_deficient"] == pytest.approx(1.0)  # 3 gradients in 2-D
    assert math.isfinite(s["median_condition_number_aligned"])
    assert "parameter_level" not in s
    assert ConflictTracker().summary()["num_sampled"] == 0


def _assert_same_history(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert list(ra) == list(rb)
        for key in ra:
            va, vb = ra[key], rb[key]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), key
            else:
                assert va == vb, key


def test_tracker_json_round_trip_is_strict_json(tmp_path: Any) -> None:
    with pytest.warns(RuntimeWarning):
        tr = _history_sequence()
    path = tmp_path / "conflict.json"
    tr.to_json(path)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    json.loads(path.read_text(), parse_constant=no_constants)
    back = ConflictTracker.from_json(path)
    assert back.every == 1 and back.task_names == ["a", "b", "c"]
    assert back.num_no_gram == 1 and back.num_sampled == 4
    assert any(r["condition_number"] == math.inf for r in back.history)
    _assert_same_history(tr.history, back.history)
    assert back.summary() == pytest.approx(tr.summary(), nan_ok=True)


def test_tracker_csv_round_trip(tmp_path: Any) -> None:
    with pytest.warns(RuntimeWarning):
        tr = _history_sequence()
    path = tmp_path / "conflict.csv"
    tr.to_csv(path)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "source", "level", "status"]
    back = ConflictTracker.from_csv(path, every=1)
    assert back.task_names == ["a", "b", "c"]
    _assert_same_history(tr.history, back.history)
    assert back.num_no_gram == 1


def test_tracker_state_dict_resume_matches_uninterrupted() -> None:
    gs = [rand_g(3, 5, seed=s) for s in range(12)]
    full = ConflictTracker(every=2, task_names=["x", "y", "z"])
    for step, g in enumerate(gs):
        full.update(step, info_from(g))
    first = ConflictTracker(every=2, task_names=["x", "y", "z"])
    for step, g in enumerate(gs[:5]):
        first.update(step, info_from(g))
    state = first.state_dict()
    resumed = ConflictTracker(every=2)
    resumed.load_state_dict(state)
    for step, g in enumerate(gs[5:], start=5):
        resumed.update(step, info_from(g))
    _assert_same_history(full.history, resumed.history)
    assert resumed.num_sampled == full.num_sampled
    with pytest.raises(ValueError, match="differ"):
        ConflictTracker(task_names=["p", "q", "r"]).load_state_dict(state)
    with pytest.raises(ValueError, match="not a ConflictTracker"):
        ConflictTracker().load_state_dict({})


# ---------------------------------------------------------------------- with a tiny model
class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def _losses(
    model: TinyModel, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    z, outs = model(x)
    return z, [((o - y[:, k]) ** 2).mean() for k, o in enumerate(outs)]


def test_parameter_level_probe_matches_explicit_gradients() -> None:
    torch.manual_seed(0)
    model = TinyModel()
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    shared = list(model.trunk.parameters())
    _, losses = _losses(model, x, y)
    explicit = []
    for loss in losses:
        gs = torch.autograd.grad(loss, shared, retain_graph=True)
        explicit.append(torch.cat([g.reshape(-1) for g in gs]).to(D64))
    g = torch.stack(explicit)
    tr = ConflictTracker(every=10, param_level_every=5)
    assert tr.update_parameter_level(3, losses, shared) is None  # not a probe step
    weights = torch.tensor([0.5, 1.0, 2.0])
    rec = tr.update_parameter_level(5, losses, shared, weights=weights)
    assert rec is not None and rec["source"] == "probe" and rec["level"] == "parameters"
    expected = summarize(g @ g.T, weights)
    assert rec["conflict_rate"] == pytest.approx(expected["conflict_rate"])
    assert rec["cos[task0,task2]"] == pytest.approx(expected["cosine"][0][2], rel=1e-6)
    assert rec["norm[task1]"] == pytest.approx(expected["norms"][1], rel=1e-6)
    assert rec["update_cos[task2]"] == pytest.approx(expected["update_cosines"][2], rel=1e-6)
    # .grad untouched, graph retained
    assert all(p.grad is None for p in model.parameters())
    torch.autograd.backward(torch.stack(losses).sum())
    assert tr.num_probes == 1 and tr.num_sampled == 0
    assert "parameter_level" in tr.summary()


def test_parameter_level_probe_with_sparse_embedding_and_unused_parameter() -> None:
    """Sparse embedding gradients (only the touched rows enter the Gram) and a parameter that
    some task does not reach give the Gram of the explicit dense gradients."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, sparse=True)
    lin = nn.Linear(4, 2)
    unused = nn.Parameter(torch.randn(3))
    ids = torch.tensor([1, 7, 7, 30])
    h = lin(emb(ids))
    losses = [h[:, 0].pow(2).mean(), (h[:, 1] - 1.0).pow(2).mean() + 0.5 * unused.sum()]
    shared = [emb.weight, lin.weight, lin.bias, unused]
    explicit = []
    for loss in losses:
        gs = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        dense = [
            torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
            for g, p in zip(gs, shared)
        ]
        explicit.append(torch.cat([g.reshape(-1) for g in dense]).to(D64))
    g = torch.stack(explicit)
    tr = ConflictTracker(every=1)
    rec = tr.update_parameter_level(0, losses, shared)
    expected = summarize(g @ g.T)
    assert rec is not None and rec["status"] == "ok"
    assert rec["norm[task0]"] == pytest.approx(expected["norms"][0], rel=1e-6)
    assert rec["norm[task1]"] == pytest.approx(expected["norms"][1], rel=1e-6)
    assert rec["cos[task0,task1]"] == pytest.approx(expected["cosine"][0][1], rel=1e-5)


def test_parameter_level_probe_rejects_bad_losses() -> None:
    model = TinyModel()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    shared = list(model.trunk.parameters())
    _, losses = _losses(model, x, y)
    tr = ConflictTracker(every=1, task_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="empty"):
        tr.update_parameter_level(0, [], shared)
    with pytest.raises(ValueError, match=r"task 1 \('b'\) must be a scalar"):
        tr.update_parameter_level(0, [losses[0], torch.stack(losses[1:]), losses[2]], shared)
    with pytest.raises(ValueError, match="does not require grad"):
        tr.update_parameter_level(0, [losses[0], losses[1], losses[2].detach()], shared)
    with pytest.raises(TypeError, match="not a Tensor"):
        tr.update_parameter_level(0, [losses[0], 1.0, losses[2]], shared)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="requires grad"):
        tr.update_parameter_level(0, losses, [torch.zeros(2)])
    assert tr.history == [] and tr.num_probes == 0


def test_tracker_with_balanced_optimizer_and_probe() -> None:
    """End to end: representation-level MGDA; the probe's update cosines are the cosines of
    the shared parameters' actual .grad with each task's parameter gradient."""
    from balancers import MGDA

    torch.manual_seed(1)
    model = TinyModel()
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.05), num_tasks=3)
    tr = ConflictTracker(every=2, param_level_every=4, task_names=["a", "b", "c"])
    shared = list(model.trunk.parameters())
    x, y = torch.randn(32, 4), torch.randn(32, 3)
    for step in range(9):
        z, losses = _losses(model, x, y)
        probe = tr.update_parameter_level(step, losses, shared)
        task_grads = None
        if probe is not None:
            task_grads = [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(L, shared, retain_graph=True)]
                )
                for L in losses
            ]
        opt.zero_grad()
        info = opt.backward(losses, representation=z)
        tr.update(step, info)
        if probe is not None:
            assert task_grads is not None
            applied = torch.cat([p.grad.reshape(-1) for p in shared if p.grad is not None])
            for k, name in enumerate(["a", "b", "c"]):
                cos = float(torch.nn.functional.cosine_similarity(applied, task_grads[k], dim=0))
                assert probe[f"update_cos[{name}]"] == pytest.approx(cos, abs=1e-5)
                assert probe[f"weight[{name}]"] == pytest.approx(float(info.weights[k]))
        opt.step()
    balance = tr.records("balance")
    assert [r["step"] for r in balance] == [0, 2, 4, 6, 8]
    assert [r["step"] for r in tr.records("probe")] == [0, 4, 8]
    assert all(r["status"] == "ok" for r in balance)
    # MGDA's update never conflicts with a task at the balance point (min-norm KKT)
    assert all(r["min_update_cosine"] >= -1e-6 for r in balance)


def test_equal_weight_needs_compute_gram() -> None:
    from balancers import EqualWeight

    model = TinyModel()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for compute_gram, status in ((None, "no_gram"), (True, "ok")):
        opt = EqualWeight(
            torch.optim.SGD(model.parameters(), lr=0.01), 3, compute_gram=compute_gram
        )
        tr = ConflictTracker(every=1)
        z, losses = _losses(model, x, y)
        opt.zero_grad()
        info = opt.backward(losses, representation=z)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = tr.update(opt.num_steps, info)
        assert rec is not None and rec["status"] == status
        assert np.isfinite(rec["conflict_rate"]) == (status == "ok")


@pytest.mark.parametrize("name", ["uw", "famo", "gradnorm"])
def test_learned_weights_are_recorded_with_or_without_a_gram(name: str) -> None:
    """Loss-level methods (UW, FAMO) have no Gram matrix: their records are ``no_gram`` but keep
    the losses and the learned weights (``info.weights``); GradNorm's records are complete."""
    from balancers.registry import balancer_class, make_balancer

    torch.manual_seed(0)
    model = TinyModel()
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    opt = make_balancer(name, torch.optim.SGD(model.parameters(), lr=0.05), 3)
    loss_level = not balancer_class(name).requires_gram
    tr = ConflictTracker(every=1, task_names=["a", "b", "c"])
    weights = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            z, losses = _losses(model, x, y)
            opt.zero_grad()
            kwargs: dict[str, Any] = {"representation": z}
            if type(opt).needs_closure:  # FAMO: re-runs the model on the same batch
                kwargs["closure"] = lambda: _losses(model, x, y)[1]
            info = opt.backward(losses, **kwargs)
            opt.step()
            tr.update(step, info)
            weights.append(info.weights.to(D64).tolist())
    assert [r["status"] for r in tr.history] == ["no_gram" if loss_level else "ok"] * 4
    assert sum("compute_gram=True" in str(w.message) for w in caught) == int(loss_level)
    for rec, w in zip(tr.history, weights):
        assert [rec[f"weight[{n}]"] for n in "abc"] == pytest.approx(w)
        assert all(np.isfinite(rec[f"loss[{n}]"]) for n in "abc")
        assert np.isnan(rec["conflict_rate"]) == loss_level
    assert len({tuple(w) for w in weights}) > 1  # learned: the weights moved
    summary = tr.summary()
    assert summary["mean_weight[a]"] == pytest.approx(np.mean([w[0] for w in weights]))
    if name == "uw":  # diagnostics on request, same weights
        opt = make_balancer(
            name, torch.optim.SGD(model.parameters(), lr=0.05), 3, compute_gram=True
        )
        z, losses = _losses(model, x, y)
        opt.zero_grad()
        diag = ConflictTracker(every=1).update(0, opt.backward(losses, representation=z))
        assert diag is not None and diag["status"] == "ok"


def test_docs_examples_run(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python examples of docs/diagnostics.md run as written (in order, shared namespace)."""
    import matplotlib

    matplotlib.use("Agg")
    doc = Path(__file__).resolve().parents[1] / "docs" / "diagnostics.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            for block in blocks:
                exec(compile(block, str(doc), "exec"), ns)
    assert (tmp_path / "conflict.json").exists() and (tmp_path / "conflict.png").exists()
    assert ConflictTracker.from_json(tmp_path / "conflict.json").task_names == [
        "ctr",
        "cvr",
        "like",
    ]
