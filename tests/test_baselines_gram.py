"""Tests for the Gram-matrix baselines IMTLG, CAGrad, NashMTL, AlignedMTL and UPGrad.

Hand-derived cases (derivations in the comments), properties with hypothesis (finite weights,
UPGrad's non-conflict, IMTL-G's equal projections, Nash-MTL's equation, CAGrad's duality gap,
Aligned-MTL's alignment, permutation equivariance, scale behaviour), both levels through the
public API on a tiny trunk + heads model, Nash-MTL's state, and parity with TorchJD 0.18 (skipped
unless the ``bench`` extra is installed).
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize  # type: ignore[import-untyped, unused-ignore]
from torch import nn

from balancers.alignedmtl import (
    AlignedMTL,
    ScaleMode,
    _alignedmtl_weights_np,
    alignedmtl_weights,
)
from balancers.cagrad import CAGrad, _cagrad_np, cagrad_weights
from balancers.imtlg import IMTLG, _imtlg_weights_np, imtlg_weights
from balancers.nashmtl import NashMTL, _nash_solve_np, nashmtl_weights
from balancers.upgrad import UPGrad, _nnqp_np, _upgrad_weights_np, upgrad_weights
from mtl import BalancedOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from _asserts import assert_no_conflict, assert_permutation_equivariant  # noqa: E402
from _models import TinyNet, batch, checkpoint_copy, flat, train_steps  # noqa: E402
from _sync_count import SyncCounter  # noqa: E402

F64 = torch.float64
METHODS: dict[str, type[BalancedOptimizer]] = {
    "imtlg": IMTLG,
    "cagrad": CAGrad,
    "nashmtl": NashMTL,
    "alignedmtl": AlignedMTL,
    "upgrad": UPGrad,
}


def gram_of(rows: Any) -> np.ndarray:
    g = np.asarray(rows, dtype=np.float64)
    out: np.ndarray = g @ g.T
    return out


def grads(params: list[nn.Parameter]) -> torch.Tensor:
    """The parameters' ``.grad`` flattened and concatenated (all must be set)."""
    out = []
    for p in params:
        assert p.grad is not None
        out.append(p.grad)
    return flat(out)


def np_weights(name: str, m: np.ndarray) -> np.ndarray:
    """Each method's stateless coefficients (NashMTL: one solve, no cap)."""
    if name == "imtlg":
        return _imtlg_weights_np(m)[0]
    if name == "cagrad":
        return _cagrad_np(m)[0]
    if name == "nashmtl":
        return _nash_solve_np(m)[0]
    if name == "alignedmtl":
        return _alignedmtl_weights_np(m)[0]
    return _upgrad_weights_np(m)[0]


def random_jacobian(k: int, d: int, seed: int, log_scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g: np.ndarray = rng.standard_normal((k, d)) * np.exp(log_scale * rng.standard_normal((k, 1)))
    return g


def cosine_condition(m: np.ndarray) -> float:
    n = np.sqrt(np.diag(m))
    if (n == 0).any():
        return math.inf
    lam = np.linalg.eigvalsh(m / np.outer(n, n))
    return math.inf if lam[0] <= 0 else float(lam[-1] / lam[0])


#: relative conflict allowed when a set holds a nearly opposite float32 pair: the exact
#: projection's weights then grow like 1/sqrt(1 + cos) ~ 1e8 and are set by rounding noise; the
#: solver keeps them moderate (least squares drops cosine-matrix eigenvalues below K eps), which
#: leaves conflicts of order sqrt(eps) (at most 4e-8 seen in 15000 random sets)
NEAR_OPPOSITE_RTOL = 1e-6


@st.composite
def gradient_cases(draw: Any, min_k: int = 1, max_k: int = 8) -> tuple[np.ndarray, bool]:
    """``(g, near_opposite)``: task gradients (K x D) with optional zeros, duplicates, norms
    over 1e-8..1e8 and a nearly opposite pair rounded to float32 (``near_opposite``); the Gram
    matrix is their float64 product."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = rng.standard_normal((k, d))
    if draw(st.booleans()):  # norms spanning 1e-8 .. 1e8
        g *= 10.0 ** rng.uniform(-8.0, 8.0, size=(k, 1))
    if k > 1 and draw(st.booleans()):  # a duplicate (possibly rescaled) gradient
        i, j = rng.choice(k, 2, replace=False)
        g[j] = g[i] * draw(st.sampled_from([1.0, 1.0, 3.0, 1e-6]))
    near_opposite = k > 1 and draw(st.booleans())
    if near_opposite:  # a nearly opposite gradient, everything rounded to float32
        i, j = rng.choice(k, 2, replace=False)
        g[j] = -g[i] * (1.0 + 1e-7 * rng.standard_normal(d))
        g = g.astype(np.float32).astype(np.float64)
    if draw(st.booleans()):  # a zero gradient
        g[rng.integers(k)] = 0.0
    return g, near_opposite


def gradient_sets(min_k: int = 1, max_k: int = 8) -> Any:
    return gradient_cases(min_k, max_k).map(lambda case: case[0])


# ====================================================================== UPGrad
def test_upgrad_orthogonal_gradients_are_kept() -> None:
    # every g_i is already in the dual cone {x : g_j . x >= 0}: v^(i) = e_i, c = 1/K
    np.testing.assert_allclose(_upgrad_weights_np(np.diag([1.0, 4.0, 9.0]))[0], [1 / 3] * 3)


def test_upgrad_two_conflicting_gradients_hand_derived() -> None:
    # g1 = (1, 0), g2 = (-1, 1): g1 . g2 = -1 < 0.
    # proj of g1 onto {g2 . x >= 0}: g1 - (g1.g2/|g2|^2) g2 = (1,0) + (-1,1)/2 = (1/2, 1/2),
    #   = 1 g1 + 1/2 g2 and g1 . (1/2, 1/2) = 1/2 >= 0, so v^(1) = (1, 1/2);
    # proj of g2 onto {g1 . x >= 0}: g2 - (g1.g2/|g1|^2) g1 = (0, 1) = 1 g1 + 1 g2, v^(2) = (1, 1);
    # c = (v^(1) + v^(2)) / 2 = (1, 3/4), d = (1/4, 3/4): g1 . d = 1/4, g2 . d = 1/2.
    m = gram_of([[1, 0], [-1, 1]])
    c, proj = _upgrad_weights_np(m)
    np.testing.assert_allclose(proj, np.array([[1, 0.5], [1, 1]]), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(c, [1, 0.75], rtol=1e-14)
    np.testing.assert_allclose(m @ c, [0.25, 0.5], rtol=1e-14)


def test_upgrad_opposite_gradients_give_zero_direction() -> None:
    # g2 = -g1: the dual cone is the hyperplane g1 . x = 0 and both projections are 0;
    # v^T M v = (v1 - v2)^2, so every v with v1 = v2 >= 1 is optimal (the solver gives (1, 1))
    c = _upgrad_weights_np(gram_of([[1.0, 2.0], [-1.0, -2.0]]))[0]
    assert c[0] == pytest.approx(c[1], rel=1e-15)
    assert c[0] >= 0.5


def test_upgrad_single_task_and_zero_gradient() -> None:
    np.testing.assert_allclose(_upgrad_weights_np(np.array([[4.0]]))[0], [1.0])
    # a zero gradient keeps v^(i)_k = [i = k]: its weight changes nothing, d is that of the others
    c = _upgrad_weights_np(gram_of([[1, 0], [0, 0], [-1, 1]]))[0]
    c2 = _upgrad_weights_np(gram_of([[1, 0], [-1, 1]]))[0]
    np.testing.assert_allclose(c[[0, 2]] * 3, c2 * 2, rtol=1e-14)  # (sum of projections) equal
    assert c[1] == pytest.approx(1 / 3)


def test_upgrad_pref_vector_and_public_function() -> None:
    m = gram_of([[1, 0], [-1, 1]])
    # p = (1, 0): d = proj of g1 = (1/2, 1/2), c = v^(1) = (1, 1/2)
    np.testing.assert_allclose(upgrad_weights(m, pref_vector=[1.0, 0.0]).numpy(), [1, 0.5])
    t = upgrad_weights(torch.from_numpy(m))
    assert isinstance(t, torch.Tensor) and t.dtype == F64
    np.testing.assert_allclose(t.numpy(), [1, 0.75], rtol=1e-14)


@settings(max_examples=1000, deadline=None)
@given(gradient_cases(min_k=2))
def test_upgrad_never_conflicts(case: tuple[np.ndarray, bool]) -> None:
    g, near_opposite = case
    m = gram_of(g)
    c, proj = _upgrad_weights_np(m)
    assert np.isfinite(c).all() and (c >= 0).all()
    assert_no_conflict(m, c, rtol=NEAR_OPPOSITE_RTOL if near_opposite else 1e-9)


@settings(max_examples=100, deadline=None)
@given(gradient_cases(min_k=2, max_k=6))
def test_upgrad_projection_kkt(case: tuple[np.ndarray, bool]) -> None:
    """Each v^(i): v >= e_i, (M v)_j >= 0 and (M v)_j (v_j - [i=j]) = 0 (complementarity), in
    cosine units (relative to |g_j| sum_k v_k |g_k|)."""
    g, near_opposite = case
    rtol = NEAR_OPPOSITE_RTOL if near_opposite else 1e-9
    m = gram_of(g)
    _, proj = _upgrad_weights_np(m)
    n = np.sqrt(np.diag(m))
    for i, v in enumerate(proj):
        e = np.eye(len(v))[i]
        assert (v >= e - 1e-15).all()
        size = float(n @ v)
        scaled = (m @ v) / np.where(n > 0, n, 1.0) / max(size, 1e-300)
        assert (scaled >= -rtol).all(), scaled
        slack = (v - e) * n / max(size, 1e-300)
        assert (np.abs(scaled * slack) <= rtol).all(), (scaled, slack)


def test_nnqp_matches_scipy_on_random_problems() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        k = int(rng.integers(2, 9))
        a = rng.standard_normal((k + 2, k))
        a /= np.linalg.norm(a, axis=0)
        c = a.T @ a
        q = c @ rng.standard_normal(k)
        x = _nnqp_np(c, q)
        ref = minimize(
            lambda z, c=c, q=q: 0.5 * z @ c @ z + q @ z,
            np.zeros(k),
            jac=lambda z, c=c, q=q: c @ z + q,
            bounds=[(0, None)] * k,
            method="L-BFGS-B",
            options={"ftol": 1e-15, "gtol": 1e-12},
        ).x
        f = 0.5 * x @ c @ x + q @ x
        assert f <= 0.5 * ref @ c @ ref + q @ ref + 1e-12


# ====================================================================== IMTL-G
def test_imtlg_orthogonal_gradients_hand_derived() -> None:
    # g1 = (a, 0), g2 = (0, b): M = diag(a^2, b^2), alpha ~ M^-1 |g| = (1/a, 1/b), normalised:
    # alpha = (b, a) / (a + b); d = ab/(a+b) (1, 1), u_k . d = ab/(a+b) for both. a=1, b=2:
    alpha, t, rank = _imtlg_weights_np(np.diag([1.0, 4.0]))
    np.testing.assert_allclose(alpha, [2 / 3, 1 / 3], rtol=1e-15)
    assert t == pytest.approx(2 / 3) and rank == 2


def test_imtlg_equal_norms_get_equal_weights() -> None:
    # |g1| = |g2|: M = [[1, c], [c, 1]] and M^-1 (1, 1) ~ (1, 1), alpha = (1/2, 1/2)
    m = gram_of([[1.0, 0.0], [math.cos(2.0), math.sin(2.0)]])
    np.testing.assert_allclose(_imtlg_weights_np(m)[0], [0.5, 0.5], rtol=1e-14)


def paper_imtlg(g: np.ndarray) -> np.ndarray:
    """The paper's closed form (Eq. 7) on the materialised vectors."""
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d_mat = g[0] - g[1:]
    u_mat = u[0] - u[1:]
    a = g[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
    return np.concatenate([[1 - a.sum()], a])


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_imtlg_matches_the_papers_formula(k: int) -> None:
    for seed in range(5):
        g = random_jacobian(k, k + 2, seed)
        alpha = _imtlg_weights_np(gram_of(g))[0]
        np.testing.assert_allclose(alpha, paper_imtlg(g), rtol=1e-8, atol=1e-10)


def test_imtlg_k2_closed_form() -> None:
    # K = 2: alpha_2 = g1.(u1 - u2) / ((g1 - g2).(u1 - u2))
    g = np.array([[3.0, 1.0], [-1.0, 2.0]])
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    a2 = g[0] @ (u[0] - u[1]) / ((g[0] - g[1]) @ (u[0] - u[1]))
    np.testing.assert_allclose(_imtlg_weights_np(gram_of(g))[0], [1 - a2, a2], rtol=1e-14)


def test_imtlg_zero_and_duplicate_gradients() -> None:
    # a zero gradient gets weight 0, the rest as without it: (1,0), (0,2) -> (2/3, 1/3)
    alpha = _imtlg_weights_np(gram_of([[1, 0], [0, 0], [0, 2]]))[0]
    np.testing.assert_allclose(alpha, [2 / 3, 0, 1 / 3], rtol=1e-14, atol=1e-16)
    # a duplicated task splits its weight (the least-squares solution of C is symmetric)
    g = random_jacobian(3, 5, 1)
    base = _imtlg_weights_np(gram_of(g))[0]
    dup = _imtlg_weights_np(gram_of(np.vstack([g, g[:1]])))[0]
    np.testing.assert_allclose(dup, [base[0] / 2, base[1], base[2], base[0] / 2], rtol=1e-9)
    # all zero: all weights 0
    assert (_imtlg_weights_np(np.zeros((3, 3)))[0] == 0).all()
    assert imtlg_weights(np.eye(2)).numpy().tolist() == [0.5, 0.5]


@settings(max_examples=150, deadline=None)
@given(gradient_sets(min_k=2))
def test_imtlg_equal_projections(g: np.ndarray) -> None:
    m = gram_of(g)
    alpha, t, _ = _imtlg_weights_np(m)
    assert np.isfinite(alpha).all()
    if cosine_condition(m) > 1e6 or not alpha.any():
        return
    assert alpha.sum() == pytest.approx(1.0, abs=1e-9)
    n = np.sqrt(np.diag(m))
    d_norm = math.sqrt(max(alpha @ m @ alpha, 0.0))
    proj = (m @ alpha) / n
    np.testing.assert_allclose(proj, t, rtol=0, atol=1e-7 * d_norm)


# ====================================================================== Aligned-MTL
def test_alignedmtl_orthogonal_hand_derived() -> None:
    # M = diag(1, 4): lambda = (4, 1), V = I, B = sqrt(1) diag(1/1, 1/2), c = B (1/2, 1/2)
    # = (1/2, 1/4), d = (1/2, 1/2): equal components along both gradients
    c, lam, rank = _alignedmtl_weights_np(np.diag([1.0, 4.0]))
    np.testing.assert_allclose(c, [0.5, 0.25], rtol=1e-15)
    np.testing.assert_allclose(lam, [4.0, 1.0])
    assert rank == 2


def test_alignedmtl_equal_norms_hand_derived() -> None:
    # |g1| = |g2| = 1, cos = 0.6: M has eigenvectors (1,1)/sqrt2 (1.6) and (1,-1)/sqrt2 (0.4);
    # w = (1/2, 1/2) lies on the first, so B w = sqrt(0.4 / 1.6) w = (1/4, 1/4)
    m = np.array([[1.0, 0.6], [0.6, 1.0]])
    np.testing.assert_allclose(_alignedmtl_weights_np(m)[0], [0.25, 0.25], rtol=1e-14)
    # scale modes: median of (1.6, 0.4) is the lower one (torch.median), rmse: mean = 1
    np.testing.assert_allclose(_alignedmtl_weights_np(m, None, "median")[0], [0.25, 0.25])
    np.testing.assert_allclose(
        _alignedmtl_weights_np(m, None, "rmse")[0], [0.5 * math.sqrt(1 / 1.6)] * 2, rtol=1e-14
    )


def test_alignedmtl_rank_deficient_and_zero() -> None:
    # duplicates g1 = g2 = (1, 0): M = [[1,1],[1,1]], rank 1, lambda = 2, V = (1,1)/sqrt2:
    # B = sqrt2 V V^T / sqrt2 = V V^T and B w = w
    c, _, rank = _alignedmtl_weights_np(np.ones((2, 2)))
    np.testing.assert_allclose(c, [0.5, 0.5], rtol=1e-14)
    assert rank == 1
    c, _, rank = _alignedmtl_weights_np(np.zeros((3, 3)))
    np.testing.assert_allclose(c, [1 / 3] * 3)  # B = I (TorchJD)
    assert rank == 0
    # task priorities: w = (1, 0) -> B e_1 = first column of B
    c = alignedmtl_weights(np.diag([1.0, 4.0]), pref_vector=[1.0, 0.0]).numpy()
    np.testing.assert_allclose(c, [1.0, 0.0])


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10**6))
def test_alignedmtl_aligns_the_system(k: int, seed: int) -> None:
    """G^T B has orthogonal rows of norm sqrt(lambda_min): B M B = lambda_min I (full rank)."""
    m = gram_of(random_jacobian(k, k + 2, seed))
    if cosine_condition(m) > 1e5:
        return
    b = np.stack(
        [_alignedmtl_weights_np(m, np.eye(k)[j])[0] for j in range(k)], axis=1
    )  # column j = B e_j
    lam_min = np.linalg.eigvalsh(m)[0]
    np.testing.assert_allclose(b @ m @ b, lam_min * np.eye(k), atol=1e-9 * lam_min)


# ====================================================================== CAGrad
def cagrad_objective(m: np.ndarray, w: np.ndarray, c: float = 0.5) -> float:
    k = m.shape[0]
    one = np.full(k, 1 / k)
    return float(w @ m @ one + c * math.sqrt(one @ m @ one) * math.sqrt(max(w @ m @ w, 0.0)))


def test_cagrad_orthogonal_equal_norms_hand_derived() -> None:
    # g1 = (1,0), g2 = (0,1): g0 = (1/2, 1/2), |g0| = 1/sqrt2. g_w . g0 = 1/2 for every w and
    # |g_w| is least at w = (1/2, 1/2) (|g_w| = 1/sqrt2), so d = g0 + c (1/sqrt2)/(1/sqrt2) g_w
    # = (1 + c) g0: c_k = (1 + c)/2 = 0.75; rescaled by 1/(1 + c^2) = 0.8: 0.6
    coef, w, lam = _cagrad_np(np.eye(2), 0.5)
    np.testing.assert_allclose(coef, [0.75, 0.75], rtol=1e-12)
    np.testing.assert_allclose(_cagrad_np(np.eye(2), 0.5, True)[0], [0.6, 0.6], rtol=1e-12)


def test_cagrad_k2_boundary_solution_hand_derived() -> None:
    # g1 = (2,0), g2 = (0,1): g0 = (1, 1/2), |g0| = sqrt5/2, phi = c sqrt5/2. With w = weight of
    # g1: f(w) = g_w.g0 + phi |g_w| = 1/2 + 3w/2 + phi sqrt(5w^2 - 2w + 1); f is convex and
    # f'(0) = 3/2 - phi >= 0 for c <= 3/sqrt5, so w = (0, 1), g_w = g2, |g_w| = 1 and
    # d = g0 + phi g2: c = (1/2, 1/2 + c sqrt5/2). Then g2 . d = 1/2 + phi <= g1 . d = 2.
    for c in (0.2, 0.5, 1.0):
        coef, w, _ = _cagrad_np(np.diag([4.0, 1.0]), c)
        np.testing.assert_allclose(w, [0, 1], atol=1e-12)
        np.testing.assert_allclose(coef, [0.5, 0.5 + c * math.sqrt(5) / 2], rtol=1e-12)


def test_cagrad_degenerate_cases() -> None:
    # c = 0: the mean gradient
    np.testing.assert_allclose(_cagrad_np(np.diag([4.0, 1.0, 9.0]), 0.0)[0], [1 / 3] * 3)
    # g0 = 0 (opposite gradients): d = g0 = 0
    coef = _cagrad_np(gram_of([[1, 2], [-1, -2]]))[0]
    assert coef[0] == coef[1]
    # K = 1: d = g + c |g| g/|g| = (1 + c) g
    np.testing.assert_allclose(_cagrad_np(np.array([[9.0]]), 0.5)[0], [1.5], rtol=1e-12)
    # a zero gradient puts 0 in the hull; the projection of g0 onto the dual cone is g0 itself
    # (g2 . g0 >= 0), which attains the optimal worst-case improvement 0
    coef, _, lam = _cagrad_np(gram_of([[0, 0], [1, 1]]))
    np.testing.assert_allclose(coef, [0.5, 0.5])
    assert lam == math.inf
    # all zero
    np.testing.assert_allclose(cagrad_weights(np.zeros((2, 2))).numpy(), [0.5, 0.5])


@settings(max_examples=120, deadline=None)
@given(gradient_cases(min_k=1, max_k=6), st.sampled_from([0.1, 0.5, 0.9, 2.0]))
def test_cagrad_zero_duality_gap(case: tuple[np.ndarray, bool], c: float) -> None:
    """``d`` is primal feasible (``|d - g0| <= c |g0|``) and its worst improvement
    ``min_k g_k . d`` equals the dual value ``f(w)``: both are optimal. Tolerances: the round-off
    of those quantities evaluated from M (nearly opposite pairs make ``|g_w|`` tiny and the
    coefficients huge, so ``|d - g0|^2`` loses digits to cancellation)."""
    g, near_opposite = case
    m = gram_of(g)
    coef, w, lam = _cagrad_np(m, c)
    assert np.isfinite(coef).all()
    k = m.shape[0]
    one = np.full(k, 1 / k)
    g0 = math.sqrt(max(one @ m @ one, 0.0))
    if not g0 > 0:
        return
    norms = np.sqrt(np.diag(m))
    # round-off of g_k . d computed from M: ~eps |g_k| sum_j |c_j| |g_j|
    size = float(norms.max()) * float(np.abs(coef) @ norms)
    dist2 = float((coef - one) @ m @ (coef - one))
    # round-off of |d - g0|^2 and of (c |g0|)^2 computed from M (1^T M 1 cancels when g0 ~ 0)
    slack = 8 * k * 2.3e-16 * (float(np.abs(coef - one) @ norms) ** 2 + (c * one @ norms) ** 2)
    assert dist2 <= (c * g0) ** 2 * (1 + 1e-9) + slack
    primal = float((m @ coef).min())
    if lam == math.inf:  # g_w = 0: d on the way from g0 to its projection onto the dual cone
        if dist2 < (c * g0) ** 2 * (1 - 1e-9) - slack:  # the whole way: worst improvement >= 0
            assert primal >= -(NEAR_OPPOSITE_RTOL if near_opposite else 1e-9) * size
        return
    assert dist2 >= (c * g0) ** 2 * (1 - 1e-9) - slack  # on the sphere
    # with a nearly opposite pair and norms many decades apart, lam can reach ~1e11 and the
    # exact min-norm solves on the shifted Gram (diagonal spanning ~1e21) stop at their
    # round-off allowance: relative gaps up to ~2e-4 were seen (1 in several thousand sets)
    gap_rtol = 1e-3 if near_opposite else 1e-8
    assert primal == pytest.approx(cagrad_objective(m, w, c), abs=gap_rtol * size)


def test_cagrad_matches_slsqp_objective() -> None:
    for seed in range(20):
        k = 2 + seed % 5
        m = gram_of(random_jacobian(k, k + 1, seed))
        _, w, _ = _cagrad_np(m)
        ref = minimize(
            lambda x, m=m: cagrad_objective(m, x),
            np.full(k, 1 / k),
            bounds=[(0, 1)] * k,
            constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert cagrad_objective(m, w) <= ref.fun + 1e-12 * abs(ref.fun) + 1e-14


# ====================================================================== Nash-MTL
def test_nashmtl_orthogonal_hand_derived() -> None:
    # M = diag(n_k^2): (M alpha)_k = n_k^2 alpha_k = 1/alpha_k, so alpha_k = 1/n_k; then
    # d = sum_k u_k and |d|^2 = K, so max_norm = 1 divides by sqrt(K)
    alpha, res, _ = _nash_solve_np(np.diag([1.0, 4.0, 0.25]))
    np.testing.assert_allclose(alpha, [1.0, 0.5, 2.0], rtol=1e-12)
    capped = nashmtl_weights(np.diag([1.0, 4.0, 0.25]), max_norm=1.0).numpy()
    np.testing.assert_allclose(capped, np.array([1.0, 0.5, 2.0]) / math.sqrt(3), rtol=1e-12)


def test_nashmtl_equal_norms_hand_derived() -> None:
    # |g1| = |g2| = n, cos = r: by symmetry alpha = (t, t), t n^2 (1 + r) = 1/t,
    # t = 1 / (n sqrt(1 + r))
    n, r = 3.0, -0.5
    m = n * n * np.array([[1.0, r], [r, 1.0]])
    t = 1 / (n * math.sqrt(1 + r))
    np.testing.assert_allclose(_nash_solve_np(m)[0], [t, t], rtol=1e-12)
    # K = 1: alpha = 1/|g|
    np.testing.assert_allclose(_nash_solve_np(np.array([[16.0]]))[0], [0.25], rtol=1e-14)


def test_nashmtl_singular_and_zero_gradients() -> None:
    # a zero gradient gets 0 and the others are solved among themselves
    alpha = _nash_solve_np(np.diag([1.0, 0.0, 4.0]))[0]
    np.testing.assert_allclose(alpha, [1.0, 0.0, 0.5], rtol=1e-12)
    # opposite gradients: no exact solution; the ridge keeps alpha finite and d = 0 exactly here
    m = gram_of([[1, 0], [-1, 0], [0, 1]])
    alpha = _nash_solve_np(m)[0]
    assert np.isfinite(alpha).all() and (alpha > 0).all()
    assert alpha @ m @ alpha <= 3 + 1e-6  # |d|^2 = K - ridge sum beta^2 <= K
    assert (nashmtl_weights(np.zeros((2, 2))).numpy() == 0).all()


@settings(max_examples=150, deadline=None)
@given(gradient_sets(min_k=1))
def test_nashmtl_equation(g: np.ndarray) -> None:
    """M alpha = 1/alpha to 1e-8 relative on well-conditioned Gram matrices; finite always."""
    m = gram_of(g)
    alpha, res, it = _nash_solve_np(m)
    assert np.isfinite(alpha).all() and (alpha >= 0).all()
    if cosine_condition(m) > 1e5:  # beyond, ridge alpha_k^2 |g_k|^2 may exceed 1e-6: no polish
        return
    np.testing.assert_allclose(alpha * (m @ alpha), 1.0, rtol=1e-8)
    assert it <= 60


def test_nashmtl_scale() -> None:
    # M -> s^2 M gives alpha -> alpha / s
    m = gram_of(random_jacobian(4, 6, 2))
    np.testing.assert_allclose(_nash_solve_np(9.0 * m)[0], _nash_solve_np(m)[0] / 3, rtol=1e-10)


# ====================================================================== shared properties
@pytest.mark.parametrize("name", list(METHODS))
@settings(max_examples=60, deadline=None)
@given(g=gradient_sets())
def test_finite_weights(name: str, g: np.ndarray) -> None:
    assert np.isfinite(np_weights(name, gram_of(g))).all()


@pytest.mark.parametrize("name", list(METHODS))
def test_permutation_equivariance(name: str) -> None:
    rng = np.random.default_rng(7)
    for k in (2, 3, 5, 8):
        m = gram_of(random_jacobian(k, k + 2, k))
        assert_permutation_equivariant(
            lambda x: np_weights(name, x), m, rng.permutation(k).tolist(), rtol=1e-8
        )


@pytest.mark.parametrize("name", ["imtlg", "cagrad", "alignedmtl", "upgrad"])
def test_invariant_to_a_global_scale(name: str) -> None:
    m = gram_of(random_jacobian(4, 6, 5))
    for s in (1e-12, 3.0, 1e10):
        np.testing.assert_allclose(np_weights(name, s * m), np_weights(name, m), rtol=1e-9)


# ====================================================================== the public API
@pytest.mark.parametrize("level", ["representation", "parameters"])
@pytest.mark.parametrize("name", list(METHODS))
def test_both_levels_apply_the_pure_function(name: str, level: str) -> None:
    k = 3
    net = TinyNet(k, seed=4)
    trunk, heads = net.shared_parameters(), net.head_parameters()
    cls = METHODS[name]
    opt = cls(torch.optim.SGD(net.parameters(), lr=0.05), k)
    assert type(opt).__name__ in repr(opt)
    for step in range(3):
        x, y = batch(k, seed=step)
        losses, z = net.losses(x, y)
        if level == "representation":
            rows = [torch.autograd.grad(lk, z, retain_graph=True)[0] for lk in losses]
        else:
            rows = [flat(torch.autograd.grad(lk, trunk, retain_graph=True)) for lk in losses]
        h = torch.stack([r.reshape(-1) for r in rows])
        want_heads = torch.autograd.grad(torch.stack(losses).sum(), heads, retain_graph=True)
        opt.zero_grad()
        if level == "representation":
            info = opt.backward(losses, representation=z)
        else:
            info = opt.backward(losses, shared_parameters=trunk)
        assert info.level == level and info.weights.shape == (k,)
        m = (h @ h.T).numpy()
        assert info.gram is not None
        np.testing.assert_allclose(info.gram.numpy(), m, rtol=1e-10)
        if name == "nashmtl":
            want_c = nashmtl_weights(info.gram, max_norm=1.0).numpy()
        else:
            want_c = np_weights(name, info.gram.numpy())
        np.testing.assert_allclose(info.weights.numpy(), want_c, rtol=1e-9, atol=1e-12)
        combined = torch.from_numpy(want_c) @ h
        if level == "representation":
            x2, _ = batch(k, seed=step)
            want_trunk = flat(
                torch.autograd.grad(net.trunk(x2), trunk, grad_outputs=combined.view_as(z))
            )
        else:
            want_trunk = combined
        torch.testing.assert_close(grads(trunk), want_trunk, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(grads(heads), flat(want_heads))
        opt.step()


def _train(opt: NashMTL, net: TinyNet, steps: range) -> list[torch.Tensor]:
    return [info.weights for info in train_steps(opt, net, steps)]


@pytest.mark.parametrize("name", list(METHODS))
def test_compute_weights_makes_no_torch_call(name: str) -> None:
    """``_compute_weights`` runs on the step's host copy: no item/cpu/numpy/... call (the
    engine's one-transfer budget), also when NashMTL reads its state back."""
    opt = METHODS[name](torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 3)
    m = gram_of(random_jacobian(3, 5, 0))
    for _ in range(3):
        with SyncCounter() as sync:
            w, extras = opt._compute_weights(m, np.ones(3), None)
        assert sync.count == 0, sync.calls
        assert isinstance(w, np.ndarray) and w.dtype == np.float64 and w.shape == (3,)


def test_nashmtl_update_every_reuses_alpha() -> None:
    net = TinyNet(3)
    opt = NashMTL(torch.optim.SGD(net.parameters(), lr=0.05), 3, update_every=3)
    flags, alphas = [], []
    for step in range(7):
        x, y = batch(3, seed=step)
        losses, z = net.losses(x, y)
        opt.zero_grad()
        info = opt.backward(losses, representation=z)
        flags.append(info.extras["updated"])
        alphas.append(info.extras["alpha"])
        # the cap uses the current Gram matrix even on reuse steps
        a = info.extras["alpha"].numpy()
        assert info.gram is not None
        norm = math.sqrt(a @ info.gram.numpy() @ a)
        np.testing.assert_allclose(info.weights.numpy(), a * min(1.0, 1.0 / norm), rtol=1e-12)
        opt.step()
    assert flags == [True, False, False, True, False, False, True]
    assert torch.equal(alphas[0], alphas[1]) and torch.equal(alphas[0], alphas[2])
    assert not torch.equal(alphas[2], alphas[3])
    assert opt.balancer_state["step"] == 7


def test_nashmtl_state_dict_round_trip_continues_identically() -> None:
    net = TinyNet(3)
    opt = NashMTL(torch.optim.Adam(net.parameters(), lr=0.01), 3, update_every=2)
    _train(opt, net, range(3))
    saved = checkpoint_copy({"model": net.state_dict(), "opt": opt.state_dict()})
    later = _train(opt, net, range(3, 7))
    final = [p.detach().clone() for p in net.parameters()]

    net2 = TinyNet(3, seed=99)
    net2.load_state_dict(saved["model"])
    opt2 = NashMTL(torch.optim.Adam(net2.parameters(), lr=0.01), 3, update_every=2)
    opt2.load_state_dict(saved["opt"])
    assert opt2.balancer_state["step"] == 3
    again = _train(opt2, net2, range(3, 7))
    assert all(torch.equal(a, b) for a, b in zip(later, again))
    for p, q in zip(final, net2.parameters()):
        assert torch.equal(p, q)


def test_nashmtl_rejects_bad_state() -> None:
    opt = NashMTL(torch.optim.SGD(TinyNet(2).parameters(), lr=0.1), 2)
    for bad in (
        {"alpha": torch.ones(3), "step": 1},
        {"alpha": torch.tensor([1.0, float("nan")]), "step": 1},
        {"alpha": torch.ones(2)},
        {"alpha": torch.ones(2), "step": -1},
        {"alpha": torch.ones(2), "step": 1, "other": 0},
    ):
        with pytest.raises(ValueError):
            opt._load_balancer_state_dict(bad)
    assert opt.balancer_state == {}


def test_nashmtl_skipped_step_leaves_state_alone() -> None:
    net = TinyNet(2)
    opt = NashMTL(torch.optim.SGD(net.parameters(), lr=0.05), 2, on_nonfinite="skip")
    x, y = batch(2)
    losses, z = net.losses(x, y)
    opt.backward(losses, representation=z)
    opt.step()
    before = copy.deepcopy(opt.balancer_state)
    assert isinstance(before["alpha"], list) and before["step"] == 1
    opt.zero_grad()
    losses, z = net.losses(x, y)
    info = opt.backward([losses[0], losses[1] * float("nan")], representation=z)
    opt.step()
    assert info.skipped and opt.num_skipped == 1
    assert opt.balancer_state == before


@pytest.mark.parametrize(
    ("cls", "kwargs", "error"),
    [
        (CAGrad, {"c": -1.0}, ValueError),
        (CAGrad, {"c": "big"}, TypeError),
        (CAGrad, {"rescale": 1}, TypeError),
        (NashMTL, {"update_every": 0}, ValueError),
        (NashMTL, {"update_every": 1.5}, TypeError),
        (NashMTL, {"max_norm": -1.0}, ValueError),
        (NashMTL, {"ridge": float("nan")}, ValueError),
        (AlignedMTL, {"scale_mode": "max"}, ValueError),
        (AlignedMTL, {"pref_vector": [1.0, -1.0]}, ValueError),
        (AlignedMTL, {"rank_rtol": -1.0}, ValueError),
        (UPGrad, {"pref_vector": [0.0, 0.0]}, ValueError),
        (UPGrad, {"reg_eps": -1e-4}, ValueError),
        (UPGrad, {"pref_vector": [1.0, 1.0, 1.0]}, ValueError),  # num_tasks=2
    ],
)
def test_bad_options_raise(
    cls: type[BalancedOptimizer], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        cls(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 2, **kwargs)


def test_pref_vector_infers_num_tasks() -> None:
    opt = UPGrad(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), pref_vector=[1, 2, 3])
    assert opt.num_tasks == 3
    assert "pref_vector=[1.0, 2.0, 3.0]" in repr(opt)


# ====================================================================== TorchJD parity
TJD_REASON = "TorchJD parity needs the bench extra: pip install -e .[bench]"
PARITY_CASES = [(k, seed) for k in range(2, 9) for seed in range(6)]


def _torchjd() -> Any:
    tj = pytest.importorskip("torchjd", reason=TJD_REASON)
    warnings.filterwarnings("ignore", module="cvxpy")
    return tj


def _direction_error(g: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ref = float(np.linalg.norm(g.T @ b))
    return float(np.linalg.norm(g.T @ (a - b))) / max(ref, 1e-300)


def _parity_cases(max_cond: float) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for k, seed in PARITY_CASES:
        g = random_jacobian(k, k + 3, 100 + seed)
        m = gram_of(g)
        if cosine_condition(m) <= max_cond:
            out.append((g, m))
    assert len(out) >= len(PARITY_CASES) // 2
    return out


def test_parity_upgrad() -> None:
    _torchjd()
    pytest.importorskip("qpsolvers", reason=TJD_REASON)
    from torchjd.aggregation import UPGradWeighting  # type: ignore[import-not-found, unused-ignore]
    from torchjd.linalg import QuadprogProjector  # type: ignore[import-not-found, unused-ignore]

    exact = UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
    default = UPGradWeighting()
    worst = [0.0, 0.0]
    for g, m in _parity_cases(1e6):
        t = torch.from_numpy(m)
        worst[0] = max(worst[0], _direction_error(g, _upgrad_weights_np(m)[0], exact(t).numpy()))
        ours = _upgrad_weights_np(m, reg_eps=1e-4)[0]
        worst[1] = max(worst[1], _direction_error(g, ours, default(t).numpy()))
    # rank-deficient Jacobians (K > D): only the regularised form is defined for quadprog
    for k in range(3, 9):
        g = random_jacobian(k, k - 1, 200 + k)
        m = gram_of(g)
        ours = _upgrad_weights_np(m, reg_eps=1e-4)[0]
        worst[1] = max(worst[1], _direction_error(g, ours, default(torch.from_numpy(m)).numpy()))
    assert max(worst) <= 1e-9, worst


def test_parity_imtlg() -> None:
    _torchjd()
    from torchjd.aggregation import IMTLGWeighting  # type: ignore[import-not-found, unused-ignore]

    w = IMTLGWeighting()
    for _g, m in _parity_cases(1e6):
        ref = w(torch.from_numpy(m)).numpy()
        np.testing.assert_allclose(_imtlg_weights_np(m)[0], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_parity_alignedmtl(scale_mode: ScaleMode) -> None:
    _torchjd()
    from torchjd.aggregation import AlignedMTLWeighting  # type: ignore[import-not-found, unused-ignore]

    w = AlignedMTLWeighting(scale_mode=scale_mode)
    rank_deficient = [(g, gram_of(g)) for g in (random_jacobian(k, k - 1, k) for k in range(3, 9))]
    for g, m in _parity_cases(1e6) + rank_deficient:
        ours = _alignedmtl_weights_np(m, None, scale_mode)[0]
        assert _direction_error(g, ours, w(torch.from_numpy(m)).numpy()) <= 1e-9


def test_parity_cagrad() -> None:
    """TorchJD solves the dual with Clarabel to ~1e-8 on the objective: the directions agree to
    that solver's tolerance, and ours is never worse on the objective."""
    _torchjd()
    pytest.importorskip("cvxpy", reason=TJD_REASON)
    from torchjd.aggregation import CAGradWeighting  # type: ignore[import-not-found, unused-ignore]

    w = CAGradWeighting(c=0.5)
    worst = 0.0
    for g, m in _parity_cases(1e6):
        coef, ours_w, _ = _cagrad_np(m, 0.5)
        ref = w(torch.from_numpy(m)).numpy()
        worst = max(worst, _direction_error(g, coef, ref))
        k = m.shape[0]
        ref_w = np.clip(ref - 1 / k, 0.0, None)  # Clarabel's w can be slightly infeasible
        ref_w = ref_w / ref_w.sum()
        scale = float(np.abs(m).max())
        assert cagrad_objective(m, ours_w) <= cagrad_objective(m, ref_w) + 1e-12 * scale
    assert worst <= 1e-3, worst


def test_parity_nashmtl() -> None:
    """TorchJD's sequential convex approximation (20 cvxpy/ECOS rounds) sometimes stops far
    from the fixed point; where its own residual ``|alpha (M alpha) - 1|`` is small, the
    weights agree to within that residual."""
    _torchjd()
    pytest.importorskip("cvxpy", reason=TJD_REASON)
    from torchjd.aggregation import NashMTL as TorchJDNashMTL  # type: ignore[import-not-found, unused-ignore]

    compared = 0
    for g, m in _parity_cases(1e6):
        k = m.shape[0]
        ref = TorchJDNashMTL(n_tasks=k, max_norm=0.0).weighting(torch.from_numpy(g)).numpy()
        ours, res, _ = _nash_solve_np(m)
        assert np.abs(ours * (m @ ours) - 1).max() <= 1e-12
        ref_res = float(np.abs(ref * (m @ ref) - 1).max())
        if ref_res <= 1e-4:
            compared += 1
            np.testing.assert_allclose(ours, ref, rtol=10 * ref_res + 1e-9)
    assert compared >= len(PARITY_CASES) // 3, compared
