"""Tests for mtl.metrics: hand-computed values, brute-force AUC, a per-group loop for GAUC,
logits consistency, errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl.metrics import (
    auc,
    binary_metrics,
    calibration,
    delta_m,
    gauc,
    log_loss,
    mse,
    normalized_entropy,
    regression_metrics,
)

Y = [1, 0, 0, 0]
P = [0.5, 0.1, 0.1, 0.1]


def brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos = s[y == 1]
    neg = s[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


# ------------------------------------------------------------------ normalized entropy / log loss


def test_ne_hand_example() -> None:
    assert log_loss(Y, P) == pytest.approx(0.252307, abs=1e-6)
    assert log_loss(Y, P) == pytest.approx((math.log(2) - 3 * math.log(0.9)) / 4, rel=1e-12)
    assert normalized_entropy(Y, P) == pytest.approx(0.448678, abs=1e-6)
    assert normalized_entropy(Y, P) == pytest.approx(0.252307 / 0.562335, abs=1e-6)
    assert normalized_entropy(Y, [0.25] * 4) == pytest.approx(1.0, abs=1e-12)


def test_ne_types_and_logits() -> None:
    y_t = torch.tensor(Y, dtype=torch.float32)
    p_t = torch.tensor(P, dtype=torch.float32, requires_grad=True)
    ne = normalized_entropy(y_t, p_t)
    assert isinstance(ne, float)
    assert ne == pytest.approx(0.448678, abs=1e-6)
    assert normalized_entropy(np.array(Y), np.array(P)) == pytest.approx(0.448678, abs=1e-6)
    logits = logit(np.array(P))
    assert normalized_entropy(Y, logits, from_logits=True) == pytest.approx(0.448678, abs=1e-6)
    assert normalized_entropy(torch.tensor(Y).bool(), torch.tensor(logits), from_logits=True) == (
        pytest.approx(0.448678, abs=1e-6)
    )


def test_ne_base_rate() -> None:
    # with base rate 0.5 the normalizer is log 2
    expected = log_loss(Y, P) / math.log(2)
    assert normalized_entropy(Y, P, base_rate=0.5) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1, 1]])
def test_ne_degenerate_base_rate(y: list[int]) -> None:
    with pytest.raises(ValueError, match="background positive rate"):
        normalized_entropy(y, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="background positive rate"):
        normalized_entropy([1, 0], [0.5, 0.5], base_rate=1.0)


def test_log_loss_hand_and_clipping() -> None:
    y = [1, 0, 1]
    p = [0.8, 0.3, 0.6]
    expected = -(math.log(0.8) + math.log(0.7) + math.log(0.6)) / 3
    assert log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    # p = 0 for a positive is clipped at eps
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert log_loss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-9)
    assert math.isfinite(log_loss([0, 1], [1.0, 0.0]))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.floats(-30, 30, allow_nan=False)), min_size=1, max_size=40
    )
)
def test_log_loss_from_logits_matches_probabilities(pairs: list[tuple[int, float]]) -> None:
    y = np.array([a for a, _ in pairs], dtype=float)
    x = np.array([b for _, b in pairs])
    p = 1.0 / (1.0 + np.exp(-x))
    by_logits = log_loss(y, x, from_logits=True)
    by_probs = log_loss(y, p, eps=1e-15)
    torch_ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x), torch.tensor(y)
    ).item()
    assert by_logits == pytest.approx(torch_ref, rel=1e-9, abs=1e-12)
    if np.all(np.abs(x) < 25):
        assert by_probs == pytest.approx(by_logits, rel=1e-6, abs=1e-9)


def test_log_loss_from_logits_is_stable() -> None:
    assert log_loss([1, 0], [1000.0, -1000.0], from_logits=True) == pytest.approx(0.0, abs=1e-12)
    assert log_loss([0], [1000.0], from_logits=True) == pytest.approx(1000.0)


def test_log_loss_errors() -> None:
    with pytest.raises(ValueError, match="from_logits"):
        log_loss([1, 0], [2.0, -1.0])
    with pytest.raises(ValueError, match="lengths"):
        log_loss([1, 0], [0.5])
    with pytest.raises(ValueError, match="1-D"):
        log_loss(np.ones((2, 2)), np.ones((2, 2)) * 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([2, 0], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        log_loss([1, 0], [float("nan"), 0.5])
    with pytest.raises(ValueError, match="empty"):
        log_loss([], [])


# ------------------------------------------------------------------ AUC


def test_auc_hand_examples() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc([1, 1, 0], [3.0, 3.0, 3.0]) == pytest.approx(0.5)
    assert auc([0, 1, 0, 1], [1.0, 2.0, 2.0, 3.0]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert auc(torch.tensor([0, 1, 1]), torch.tensor([-1.0, 2.0, 0.5])) == pytest.approx(1.0)
    assert auc(np.array([True, False]), np.array([0.0, 1.0])) == pytest.approx(0.0)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4)), min_size=2, max_size=60),
    st.booleans(),
)
def test_auc_matches_brute_force_heavy_ties(pairs: list[tuple[int, int]], as_tensor: bool) -> None:
    y = np.array([a for a, _ in pairs])
    s = np.array([b for _, b in pairs], dtype=float) / 4.0
    if y.min() == y.max():
        with pytest.raises(ValueError, match="one class"):
            auc(y, s)
        return
    expected = brute_force_auc(y, s)
    got = auc(torch.tensor(y), torch.tensor(s)) if as_tensor else auc(y, s)
    assert got == pytest.approx(expected, abs=1e-12)


def test_auc_random_continuous_scores() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y
    assert auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)
    # invariant to monotone maps
    assert auc(y, 1 / (1 + np.exp(-s))) == pytest.approx(auc(y, s), abs=1e-12)


def test_auc_errors() -> None:
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="lengths"):
        auc([0, 1], [0.1])


# ------------------------------------------------------------------ MSE, Δm, bundles


def test_mse() -> None:
    assert mse([1.0, 2.0, 3.0], [1.0, 0.0, 4.0]) == pytest.approx(5.0 / 3.0)
    assert mse(torch.tensor([0.5]), torch.tensor([0.5])) == 0.0
    with pytest.raises(ValueError):
        mse([1.0], [1.0, 2.0])


def test_delta_m_hand_example() -> None:
    metrics = {"auc": 0.77, "mse": 0.9}
    baselines = {"auc": 0.7, "mse": 1.0}
    higher = {"auc": True, "mse": False}
    # auc +10 % (better), mse -10 % (better) → +10
    assert delta_m(metrics, baselines, higher) == pytest.approx(10.0)
    # worse on both: auc -10 %, mse +20 % → (-10 - 20) / 2
    worse = {"auc": 0.63, "mse": 1.2}
    assert delta_m(worse, baselines, higher) == pytest.approx(-15.0)
    assert delta_m(baselines, baselines, higher) == 0.0
    # single metric, lower is better
    assert delta_m({"ne": 0.99}, {"ne": 1.0}, {"ne": False}) == pytest.approx(1.0)


def test_delta_m_errors() -> None:
    with pytest.raises(ValueError, match="same keys"):
        delta_m({"a": 1.0}, {"b": 1.0}, {"a": True})
    with pytest.raises(ValueError, match="same keys"):
        delta_m({"a": 1.0}, {"a": 1.0}, {"b": True})
    with pytest.raises(ValueError, match="non-zero"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})
    with pytest.raises(ValueError, match="at least one"):
        delta_m({}, {}, {})


def test_binary_and_regression_metrics() -> None:
    logits = logit(np.array(P))
    out = binary_metrics(torch.tensor(Y), torch.tensor(logits, dtype=torch.float32))
    assert set(out) == {"auc", "log_loss", "ne"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["auc"] == pytest.approx(1.0)
    assert out["log_loss"] == pytest.approx(0.252307, abs=1e-6)
    assert out["ne"] == pytest.approx(0.448678, abs=1e-6)
    reg = regression_metrics(np.array([1.0, 3.0]), np.array([2.0, 3.0]))
    assert reg == {"mse": pytest.approx(0.5)}


# ------------------------------------------------------------------ GAUC


def reference_gauc(
    y: np.ndarray, s: np.ndarray, g: np.ndarray, w: np.ndarray | None = None
) -> float:
    """The straightforward definition: a loop over the groups calling :func:`auc`, groups with
    one class skipped, weighted by the group size (or the group's summed row weights)."""
    num = den = 0.0
    for key in np.unique(g):
        m = g == key
        if 0 < y[m].sum() < m.sum():
            wg = float(m.sum()) if w is None else float(w[m].sum())
            num += wg * auc(y[m], s[m])
            den += wg
    return num / den


def test_gauc_hand_example() -> None:
    # a: [0, 0, 1, 1] scored [.1, .4, .35, .8] → AUC 3/4; b: [1, 0] → 1; c: [1, 1] skipped
    y = [0, 0, 1, 1, 1, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.5, 0.6]
    g = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    assert gauc(y, s, g) == pytest.approx((4 * 0.75 + 2 * 1.0) / 6, abs=1e-15)
    # weighted by clicks (weights = labels): a has 2 clicks, b 1 → (2·0.75 + 1) / 3
    assert gauc(y, s, g, weights=y) == pytest.approx((2 * 0.75 + 1.0) / 3, abs=1e-15)
    # explicit per-group weights: only b counts
    w = [0, 0, 0, 0, 1, 1, 5, 5]
    assert gauc(y, s, g, weights=w) == pytest.approx(1.0, abs=1e-15)
    # the rows of a group need not be contiguous, and integer / tensor ids work alike
    perm = [7, 0, 4, 2, 6, 1, 5, 3]
    gi = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    assert gauc(np.array(y)[perm], np.array(s)[perm], gi[perm]) == pytest.approx(5 / 6)


def test_gauc_ties_within_and_across_groups() -> None:
    # group 0: all tied → 0.5; group 1: [0, 1, 0, 1] on [1, 2, 2, 3] → 3.5 / 4
    y = [1, 0, 0, 0, 1, 0, 1]
    s = [2.0, 2.0, 2.0, 1.0, 2.0, 2.0, 3.0]
    g = [0, 0, 0, 1, 1, 1, 1]
    assert gauc(y, s, g) == pytest.approx((3 * 0.5 + 4 * 3.5 / 4) / 7, abs=1e-15)
    # the same score in another group does not tie across groups
    assert gauc([0, 1, 0, 1], [1.0, 1.0, 1.0, 2.0], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_gauc_matches_reference_on_random_data() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    g = rng.integers(0, 1_000, n)
    y = (rng.random(n) < 0.2).astype(float)
    s = np.round(rng.normal(size=n) + y, 1)  # rounded: many ties
    w = rng.random(n)
    assert gauc(y, s, g) == pytest.approx(reference_gauc(y, s, g), abs=1e-12)
    assert gauc(y, s, g, weights=w) == pytest.approx(reference_gauc(y, s, g, w), abs=1e-12)
    # string ids and float32 tensors give the same value
    gs = np.array([f"user{k}" for k in g])
    got = gauc(torch.tensor(y), torch.tensor(s, dtype=torch.float32), gs)
    ref = reference_gauc(y, s.astype(np.float32).astype(np.float64), g)
    assert got == pytest.approx(ref, abs=1e-12)


def test_gauc_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    n = 3_000
    g = rng.integers(0, 100, n)
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.integers(0, 6, n) + y  # heavy ties
    num = den = 0.0
    for key in np.unique(g):
        m = g == key
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * metrics.roc_auc_score(y[m], s[m])
            den += m.sum()
    assert gauc(y, s, g) == pytest.approx(num / den, abs=1e-12)


_rows = st.lists(
    st.tuples(st.integers(0, 1), st.integers(0, 4), st.integers(0, 5), st.integers(0, 3)),
    min_size=2,
    max_size=60,
)


def _has_valid_group(y: np.ndarray, g: np.ndarray) -> bool:
    return any(0 < y[g == k].sum() < (g == k).sum() for k in np.unique(g))


@settings(max_examples=100, deadline=None)
@given(_rows, st.randoms(use_true_random=False))
def test_gauc_reference_and_row_permutation(
    rows: list[tuple[int, int, int, int]], rnd: random.Random
) -> None:
    y = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] for r in rows], dtype=float) / 4.0
    g = np.array([r[2] for r in rows])
    w = np.array([r[3] for r in rows], dtype=float)
    if not _has_valid_group(y, g):
        with pytest.raises(ValueError, match="both classes"):
            gauc(y, s, g)
        return
    value = gauc(y, s, g)
    assert value == pytest.approx(reference_gauc(y, s, g), abs=1e-12)
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    assert gauc(y[perm], s[perm], g[perm]) == pytest.approx(value, abs=1e-12)
    # relabelling the groups changes nothing
    assert gauc(y, s, np.array([f"q{9 - k}" for k in g])) == pytest.approx(value, abs=1e-12)
    # constant row weights are the default (impressions); any scale gives the same value
    assert gauc(y, s, g, weights=np.full(len(rows), 2.5)) == pytest.approx(value, abs=1e-12)
    valid_w = sum(w[g == k].sum() for k in np.unique(g) if 0 < y[g == k].sum() < (g == k).sum())
    if valid_w > 0:
        assert gauc(y, s, g, weights=w) == pytest.approx(reference_gauc(y, s, g, w), abs=1e-12)
        assert gauc(y[perm], s[perm], g[perm], w[perm]) == pytest.approx(
            gauc(y, s, g, w), abs=1e-12
        )
    else:
        with pytest.raises(ValueError, match="sum to 0"):
            gauc(y, s, g, weights=w)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4)), min_size=2, max_size=60),
    st.integers(-3, 3),
)
def test_gauc_single_group_equals_auc(pairs: list[tuple[int, int]], group: int) -> None:
    y = np.array([a for a, _ in pairs])
    s = np.array([b for _, b in pairs], dtype=float)
    g = np.full(len(pairs), group)
    if y.min() == y.max():
        with pytest.raises(ValueError, match="both classes"):
            gauc(y, s, g)
        return
    assert gauc(y, s, g) == pytest.approx(auc(y, s), abs=1e-12)
    assert gauc(y, s, g, weights=np.arange(1, len(pairs) + 1)) == pytest.approx(
        auc(y, s), abs=1e-12
    )


def test_gauc_is_invariant_to_monotone_maps_of_scores() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    x = rng.normal(size=500) + y
    g = rng.integers(0, 30, 500)
    assert gauc(y, 1 / (1 + np.exp(-x)), g) == pytest.approx(gauc(y, x, g), abs=1e-12)


def test_gauc_errors() -> None:
    y, s, g = [0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]
    with pytest.raises(ValueError, match="none of the 2 groups holds both classes"):
        gauc([0, 0, 1, 1], s, g)
    with pytest.raises(ValueError, match="groups have different lengths"):
        gauc(y, s, [0, 0, 1])
    with pytest.raises(ValueError, match="y_score have different lengths"):
        gauc(y, s[:3], g)
    with pytest.raises(ValueError, match="weights have different lengths"):
        gauc(y, s, g, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="y_score contains NaN"):
        gauc(y, [0.1, float("nan"), 0.3, 0.4], g)
    with pytest.raises(ValueError, match="groups contains NaN"):
        gauc(y, s, [0.0, float("nan"), 1.0, 1.0])
    with pytest.raises(ValueError, match="groups contains None"):
        gauc(y, s, np.array(["a", None, "b", "b"], dtype=object))
    with pytest.raises(ValueError, match="one sortable type"):
        gauc(y, s, np.array(["a", 1, "b", 2], dtype=object))
    with pytest.raises(ValueError, match="groups must be 1-D"):
        gauc(y, s, np.zeros((4, 1)))
    with pytest.raises(ValueError, match="0/1"):
        gauc([0, 2, 0, 1], s, g)
    with pytest.raises(ValueError, match="non-negative"):
        gauc(y, s, g, weights=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        gauc(y, s, g, weights=[1.0, float("inf"), 1.0, 1.0])
    with pytest.raises(ValueError, match="weights contains NaN"):
        gauc(y, s, g, weights=[1.0, float("nan"), 1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        gauc(y, s, g, weights=[0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="integer or string ids"):
        gauc(y, s, torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="empty"):
        gauc([], [], [])


# ------------------------------------------------------------------ calibration


def test_calibration_hand_example_and_logits() -> None:
    # predicted rate 0.2, observed 0.25
    assert calibration(Y, P) == pytest.approx(0.8, abs=1e-15)
    assert calibration(Y, logit(np.array(P)), from_logits=True) == pytest.approx(0.8, abs=1e-12)
    assert calibration(torch.tensor(Y), torch.tensor(P)) == pytest.approx(0.8, abs=1e-7)
    assert calibration([1, 0], [0.5, 0.5]) == pytest.approx(1.0)
    # soft labels: observed rate 0.5; huge logits saturate without overflow
    assert calibration([0.5, 0.5], [1000.0, -1000.0], from_logits=True) == pytest.approx(1.0)


def test_calibration_errors() -> None:
    with pytest.raises(ValueError, match="no positive label"):
        calibration([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="from_logits"):
        calibration([1, 0], [2.0, -1.0])
    with pytest.raises(ValueError, match="lengths"):
        calibration([1, 0], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        calibration([1, 0], [float("nan"), 0.5])
