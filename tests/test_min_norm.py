"""Tests for the exact min-norm solver (balancers._min_norm): KKT, oracle, symmetries, projection.

The min-norm problem is ``min_{alpha in simplex} alpha^T M alpha`` with ``M = G G^T``; its KKT
conditions are ``(M alpha)_i >= alpha^T M alpha`` for every ``i``, with equality where
``alpha_i > 0`` (reference/methods.md, Sec. 6.10).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from balancers import min_norm_weights, project_simplex

sys.path.insert(0, str(Path(__file__).parent))
from _asserts import assert_min_norm_kkt, exact_min_norm  # noqa: E402

SUPPORT = 1e-9  # alpha_i above this counts as "in the support"


# ---------------------------------------------------------------------- helpers
def solve(g: np.ndarray, **kwargs: float) -> np.ndarray:
    """min_norm_weights on the Gram matrix of the rows of ``g``, as a numpy array."""
    m = torch.from_numpy(g @ g.T)
    alpha = min_norm_weights(m, **kwargs)
    assert isinstance(alpha, torch.Tensor)
    assert alpha.dtype == torch.float64
    assert alpha.shape == (g.shape[0],)
    return alpha.numpy()


def assert_on_simplex(alpha: np.ndarray) -> None:
    assert np.isfinite(alpha).all(), alpha
    assert (alpha >= 0).all(), alpha
    assert abs(alpha.sum() - 1.0) < 1e-12, alpha.sum()


def assert_kkt(m: np.ndarray, alpha: np.ndarray) -> None:
    """Relative KKT: ``g_k . d >= |d|^2 (1 - 1e-6)``, equality on the support, up to the
    round-off of representing alpha in float64 (tests/_asserts.py)."""
    assert_min_norm_kkt(m, alpha, rtol=1e-6)


def sym_gram(g: np.ndarray) -> np.ndarray:
    """``G G^T`` of the rows of ``g``, made exactly symmetric (the float product need not be)."""
    m = g @ g.T
    return 0.5 * (m + m.T)


def kkt_weights(m: np.ndarray) -> np.ndarray:
    """``min_norm_weights(m)`` as a numpy array, checked by :func:`assert_kkt`."""
    alpha = min_norm_weights(m).numpy()
    assert_kkt(m, alpha)
    return alpha


def oracle(m: np.ndarray) -> tuple[float, np.ndarray]:
    """Brute force: the equality-constrained QP on every support, the best feasible point."""
    k = m.shape[0]
    best_value, best_alpha = np.inf, np.zeros(k)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = m[np.ix_(s, s)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            beta = sol[:size]
            if np.abs(kkt @ sol - rhs).max() > 1e-9 or (beta < -1e-12).any():
                continue  # singular and inconsistent, or infeasible
            alpha = np.zeros(k)
            alpha[s] = np.clip(beta, 0.0, None)
            alpha /= alpha.sum()
            value = float(alpha @ m @ alpha)
            if value < best_value:
                best_value, best_alpha = value, alpha
    return best_value, best_alpha


def is_independent(g: np.ndarray, max_cond: float = 1e6) -> bool:
    """Rows linearly independent, and not nearly dependent after normalising each row."""
    norms = np.linalg.norm(g, axis=1)
    if g.shape[1] < g.shape[0] or (norms == 0).any():
        return False
    return bool(np.linalg.cond(g / norms[:, None]) < max_cond)


# ---------------------------------------------------------------------- strategies
ENTRY = st.integers(-1000, 1000).map(lambda i: i / 1000.0)  # grid: exact ties and dependences
EXPONENT = st.floats(-8.0, 8.0, allow_nan=False)  # per-row scale 10^-8 .. 10^8


@st.composite
def gradient_matrices(draw: st.DrawFn, min_k: int = 2, max_k: int = 8) -> np.ndarray:
    """K x D gradients (K in [min_k, max_k], D in 1..12) with zero rows, duplicates, wild scales."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(1, 12))
    g = np.array(draw(st.lists(st.lists(ENTRY, min_size=d, max_size=d), min_size=k, max_size=k)))
    scales = 10.0 ** np.array(draw(st.lists(EXPONENT, min_size=k, max_size=k)))
    g = g * scales[:, None]
    for i in range(k):
        action = draw(st.sampled_from(["keep", "keep", "keep", "zero", "duplicate"]))
        if action == "zero":
            g[i] = 0.0
        elif action == "duplicate" and i > 0:
            g[i] = g[draw(st.integers(0, i - 1))]
    return g


@st.composite
def independent_matrices(draw: st.DrawFn, min_k: int = 2, max_k: int = 8) -> np.ndarray:
    """K x D gradients with linearly independent rows (D >= K), per-row scales 10^-8 .. 10^8."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(k, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed).standard_normal((k, d))
    scales = 10.0 ** np.array(draw(st.lists(EXPONENT, min_size=k, max_size=k)))
    g = g * scales[:, None]
    assume(is_independent(g))
    return g


def random_matrix(rng: np.random.Generator, k: int, degenerate: bool) -> np.ndarray:
    d = int(rng.integers(1, 13)) if degenerate else int(rng.integers(k, 13))
    g = rng.standard_normal((k, d)) * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
    if degenerate:
        for i in range(1, k):
            u = rng.random()
            if u < 0.15:
                g[i] = 0.0
            elif u < 0.3:
                g[i] = g[rng.integers(0, i)]
            elif u < 0.4:
                g[i] = -g[rng.integers(0, i)]
    return g


# ---------------------------------------------------------------------- hand cases
# reference/methods.md Sec. 6.10 (the pure solver; MGDA-level and wrapper-level in test_mgda.py)
SANITY = [
    ([[1, 0], [0, 1]], [0.5, 0.5]),
    ([[1, 0], [-1, 1]], [0.6, 0.4]),
    ([[1, 0], [2, 0]], [1.0, 0.0]),
    ([[1, 0], [-1, 0]], [0.5, 0.5]),
    ([[1, 0], [0, 1], [1, 1]], [0.5, 0.5, 0.0]),
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1 / 3, 1 / 3, 1 / 3]),
]


@pytest.mark.parametrize(("rows", "expected"), SANITY)
def test_sanity_cases(rows: list[list[float]], expected: list[float]) -> None:
    g = np.array(rows, dtype=np.float64)
    alpha = solve(g)
    np.testing.assert_allclose(alpha, expected, atol=1e-9, rtol=0)
    assert_on_simplex(alpha)
    assert_kkt(g @ g.T, alpha)


def test_sanity_cases_exact_kkt_values() -> None:
    # (1,0), (-1,1): d = (0.2, 0.4), g_1.d = g_2.d = |d|^2 = 0.2
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    d = solve(g) @ g
    np.testing.assert_allclose(d, [0.2, 0.4], atol=1e-9)
    np.testing.assert_allclose(g @ d, [0.2, 0.2], atol=1e-9)
    # opposite gradients: Pareto-stationary, d = 0
    g = np.array([[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(solve(g) @ g, [0.0, 0.0], atol=1e-12)


def test_accepts_numpy_and_float32_gram() -> None:
    m = np.array([[1.0, -1.0], [-1.0, 2.0]])
    np.testing.assert_allclose(min_norm_weights(m).numpy(), [0.6, 0.4], atol=1e-9)
    alpha = min_norm_weights(torch.tensor(m, dtype=torch.float32))
    assert alpha.dtype == torch.float64
    np.testing.assert_allclose(alpha.numpy(), [0.6, 0.4], atol=1e-6)


def test_degenerate_inputs() -> None:
    np.testing.assert_array_equal(min_norm_weights(torch.tensor([[3.0]])).numpy(), [1.0])
    np.testing.assert_array_equal(min_norm_weights(torch.zeros(4, 4)).numpy(), [0.25] * 4)
    # a single zero gradient among non-zero ones takes all the weight (d = 0)
    g = np.array([[1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]])
    np.testing.assert_allclose(solve(g), [0.0, 1.0, 0.0], atol=1e-9)
    # all gradients identical: any alpha is optimal, ties are split equally
    g = np.array([[1.0, -2.0]] * 3)
    np.testing.assert_array_equal(solve(g), [1 / 3] * 3)


@pytest.mark.parametrize(
    ("gram", "match"),
    [
        (torch.zeros(2, 3), "square"),
        (torch.zeros(0, 0), "non-empty"),
        (torch.zeros(3), "square"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN or infinite"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "NaN or infinite"),
    ],
)
def test_bad_gram_raises(gram: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        min_norm_weights(gram)


def test_face_optimum_is_exact() -> None:
    """Where Frank-Wolfe stalls (optimum on a face), the active-set solver is exact."""
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [0.5, 4.0]])
    np.testing.assert_allclose(solve(g), [0.5, 0.5, 0.0, 0.0, 0.0], atol=1e-9)


# ---------------------------------------------------------------------- wide norm ratios
# issue 16 row 5: the old solver scaled by the largest Gram diagonal and added a 1e-12 ridge, so
# at task-gradient norm ratios of 1e4 and more it returned (0.503, 1.5e-7, 0.497) here, a
# direction conflicting with task 0 (cos -0.998), instead of the exact optimum.
WIDE = np.array([[5e-7, 1e-6, -1e-7], [-1.3e6, 8e5, 4e5], [0.3, -0.4, -0.1]])
DIRECTIONS = np.array([[0.5, 1.0, -0.1], [-1.3, 0.8, 0.4], [0.3, -0.4, -0.1]])


def _exact_alpha(m: np.ndarray) -> np.ndarray:
    found = exact_min_norm(m)
    assert found is not None
    return np.array([float(a) for a in found[1]])


def test_wide_norm_ratio_example_is_exact() -> None:
    m = sym_gram(WIDE)
    alpha = solve(WIDE)
    exact = _exact_alpha(m)
    np.testing.assert_allclose(exact, [0.999994, 1.8e-12, 6.1e-6], rtol=0.02)
    np.testing.assert_allclose(alpha, exact, rtol=1e-9, atol=0)  # every weight, relatively
    assert_kkt(m, alpha)
    d = alpha @ WIDE
    assert float(WIDE[0] @ d) > 0  # no conflict with task 0 (was cos -0.998)


@pytest.mark.parametrize("ratio", [1e2, 1e4, 1e5, 1e6, 1e8])
def test_wide_norm_ratios_match_the_exact_optimum(ratio: float) -> None:
    """Gradients ``(v_0 / r, r v_1, v_2)``: norms spanning ``r^2``; the weights match the exact
    rational optimum of the same float64 Gram matrix to 1e-9 relative (old: 7e-3 absolute at
    r = 1e4, 0.5 from r = 1e6 on)."""
    g = DIRECTIONS * np.array([[1 / ratio], [ratio], [1.0]])
    m = sym_gram(g)
    alpha = kkt_weights(m)
    np.testing.assert_allclose(alpha, _exact_alpha(m), rtol=1e-9, atol=0)


def test_wide_norm_ratios_random_sets_match_the_exact_optimum() -> None:
    rng = np.random.default_rng(0)
    for ratio in (1e2, 1e5, 1e8):
        for _ in range(10):
            k = int(rng.integers(3, 5))
            g = rng.standard_normal((k, 6)) * ratio ** rng.uniform(-0.5, 0.5, (k, 1))
            m = sym_gram(g)
            alpha = kkt_weights(m)
            np.testing.assert_allclose(alpha, _exact_alpha(m), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_an_exactly_zero_gradient_gives_d_zero_at_any_scale(scale: float) -> None:
    g = np.array([[1e8, 2.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 1e-8, 5.0], [0.0, 0.0, 0.0]]) * scale
    alpha = solve(g)
    np.testing.assert_array_equal(alpha, [0.0, 0.5, 0.0, 0.5])
    assert not (alpha @ g).any()  # d = 0 exactly


# ---------------------------------------------------------------------- nearly opposite pairs
# Found by the property suite (test_properties.py, mgda): g_3 ~ -g_2 (1 + 3e-8) and a tiny g_1.
# The normalised directions of g_2 and g_3 agree to round-off (C_23 = -1 in the Jacobi-scaled
# float64 matrix), but the Gram entries still resolve |g_2 + g_3|^2 = M_22 + M_33 + 2 M_23, and
# the optimum uses that sum. The float solve stopped at alpha = (0, 1, 2.5e-12, 0), where task 3's
# exact KKT gap is -4.0e-13 against |d|^2 = 1.6e-15 (allowance 3.4e-18).
OPPOSITE = np.array(
    [
        [1.0, -2.0, 1.0, 1.0],
        [-1e-8, 1e-8, 3e-8, -3e-8],
        [3.55655882e03, -5.33483823e03, 1.77827941e03, 3.55655882e03],
        [-3.55655884e03, 5.33483838e03, -1.77827942e03, -3.55655884e03],
    ]
)
#: nearly opposite float32 copies (g_i = -float32(g_j)) next to small and large gradients
OPPOSITE32 = [
    [
        [-246278.56515053948, 48262.44386838045, 66473.53004107546, -147352.66874447468]
        + [65140.920469386845, 72102.31092069038, -92641.66429072736],
        [260735664.0, -91774680.0, -24458446.0, -3880819.5, -144038832.0, 231024288.0]
        + [-111006992.0],
        [1.6050507075248646e-05, 7.874025692389699e-05, -9.952561580382274e-05]
        + [3.628977051999287e-05, 1.2285476513610734e-05, 0.0001611916219546417]
        + [-1.3829134613238497e-05],
        [-0.8843033740321735, -1.616191452183676, 1.6881112194529182, -1.5206622761149302]
        + [-1.3834651320687659, 0.45051143434726704, -1.1372750468308352],
        [246278.5625, -48262.4453125, -66473.53125, 147352.671875, -65140.921875, -72102.3125]
        + [92641.6640625],
        [-0.8843033740321735, -1.616191452183676, 1.6881112194529182, -1.5206622761149302]
        + [-1.3834651320687659, 0.45051143434726704, -1.1372750468308352],
    ],
    [
        [0.6066666975840421, 0.11531263610595309, 1.7936264445788581, -0.06547281175109221],
        [-3023.0412824778186, 2948.689919055154, 3820.685007261234, 4213.622216639882],
        [0.0001415454839308743, -0.00013981423637897728, 0.00025520800442019906]
        + [8.355430023191315e-05],
        [-135068866.02485391, 134778411.94131237, -53317548.69067037, -14437624.939239088],
        [135068864.0, -134778416.0, 53317548.0, 14437625.0],
    ],
]


def test_nearly_opposite_pair_next_to_a_tiny_gradient_is_exact() -> None:
    from balancers.mgda import _mgda_weights_np

    m = OPPOSITE @ OPPOSITE.T
    c, alpha, scales = _mgda_weights_np(m, np.ones(4))
    np.testing.assert_array_equal(c, alpha)
    np.testing.assert_array_equal(scales, np.ones(4))
    assert_kkt(m, alpha)  # exact rational KKT on the float64 Gram matrix
    exact = _exact_alpha(m)
    np.testing.assert_allclose(exact, [0.0, 0.99994071, 2.9645034e-05, 2.9645031e-05], rtol=1e-7)
    np.testing.assert_allclose(alpha, exact, rtol=1e-9, atol=0)  # tasks 2 and 3 in the support
    np.testing.assert_array_equal(min_norm_weights(torch.from_numpy(m)).numpy(), alpha)
    for e in (-60, 60):  # the power-of-two scaling stays exact on the rational path
        np.testing.assert_array_equal(min_norm_weights(np.ldexp(m, e)).numpy(), alpha)


@pytest.mark.parametrize("rows", OPPOSITE32, ids=["k6", "k5"])
def test_nearly_opposite_float32_pairs_satisfy_kkt(rows: list[list[float]]) -> None:
    g = np.array(rows)
    m = sym_gram(g)
    alpha = kkt_weights(m)
    if g.shape[0] <= 5:
        np.testing.assert_allclose(alpha, _exact_alpha(m), rtol=1e-9, atol=0)
    for scale in (1e-4, 1e4):  # the same geometry, rescaled rows
        g2 = g.copy()
        g2[1] *= scale
        kkt_weights(sym_gram(g2))


#: an exactly opposite pair (g_j = -g_i) next to tiny gradients: d = 0 is the optimum, but the
#: float solve stopped, in most task orders, at a point built from the tiny gradients whose KKT
#: gaps are below the round-off of g_k . d for the pair (the relabelled solves disagreed)
EXACT_OPPOSITE = [
    [
        [0.0, -3e-08, 3e-08, 2e-08, -2e-08, -1e-08, 3e-08, 3e-08],
        [-2.0, -2.0, -3.0, 2.0, 3.0, 1.0, 1.0, 0.0],
        [-5e7, -5e7, -1.5e8, 1.5e8, 5e7, 0.0, -1e8, 1e8],
        [5e7, 5e7, 1.5e8, -1.5e8, -5e7, -0.0, 1e8, -1e8],
        [-1e8, -1e8, -3e8, 3e8, 1e8, 0.0, -2e8, 2e8],
        [-2.0, -2.0, -3.0, 2.0, 3.0, 1.0, 1.0, 0.0],
    ],
    [
        [-17053010.06239403, 82282092.96533254, 19807189.186644442, 11595887.42112726],
        [17053010.06239403, -82282092.96533254, -19807189.186644442, -11595887.42112726],
        [-1.5887954565941338e-09, 1.8960816648970633e-07, 5.956309330484173e-08]
        + [1.648631260291385e-07],
        [1.2287953091909224e-05, 2.4794778884282433e-06, 1.3840786020075314e-05]
        + [-1.3869630388915784e-06],
        [121.40314110441327, -216.49077527363897, 117.79964580808483, -176.27659543774746],
    ],
]


@pytest.mark.parametrize("rows", EXACT_OPPOSITE, ids=["collinear", "negated"])
def test_exactly_opposite_gradients_give_d_zero_in_every_order(rows: list[list[float]]) -> None:
    g = np.array(rows)
    m = sym_gram(g)
    alpha = kkt_weights(m)
    d = alpha @ g
    scale = float(alpha @ np.linalg.norm(g, axis=1))
    assert float(d @ d) <= (1e-12 * scale) ** 2  # d = 0 up to round-off of the combination
    for perm in itertools.islice(itertools.permutations(range(len(g))), 0, None, 7):
        p = np.array(perm)
        moved = np.empty_like(alpha)
        moved[p] = min_norm_weights(np.ascontiguousarray(m[np.ix_(p, p)])).numpy()
        diff = moved - alpha
        assert float(diff @ m @ diff) <= (1e-6 * scale) ** 2, perm


def test_merged_near_duplicates_keep_the_kkt_equality() -> None:
    """Tasks 3-5 are duplicates to 1e-8 (merged before the solve); the merged weights passed the
    KKT inequalities but not task 2's equality (a huge gradient with weight 2e-5: its positive
    gap was balanced by round-off-sized negative gaps of the heavy tasks)."""
    g = np.array(
        [
            [-1e-08, 1e-08, 2e-08, -1e-08, -3e-08, 2e-08, -1e-08],
            [3e-08, 0.0, 2e-08, -1e-08, 3e-08, -1e-08, 3e-08],
            [-0.0002, -0.0003, 0.0, 0.0, 0.0002, 0.0001, -0.0002],
            [1.999999987845058e-08, -2.999999892949745e-08, 9.99999993922529e-09]
            + [-9.99999993922529e-09, -1.999999987845058e-08, 2.999999892949745e-08]
            + [-2.999999892949745e-08],
            [2e-08, -3e-08, 1e-08, -1e-08, -2e-08, 3e-08, -3e-08],
            [1.999999987845058e-08, -2.999999892949745e-08, 9.99999993922529e-09]
            + [-9.99999993922529e-09, -1.999999987845058e-08, 2.999999892949745e-08]
            + [-2.999999892949745e-08],
        ]
    )
    kkt_weights(sym_gram(g))


def test_exact_affine_minimizer() -> None:
    """The rational affine solve of the fallback: exact on a nearly singular pair, ``None`` on a
    singular or an indefinite system."""
    from fractions import Fraction

    from balancers._min_norm import _exact_affine

    m = OPPOSITE @ OPPOSITE.T
    q = m[1:, 1:]
    found = _exact_affine(q)
    assert found is not None
    b, value = found
    fq = [[Fraction(float(x)) for x in row] for row in q]
    fb = [Fraction(float(x)) for x in b]
    lam = [sum((fq[i][j] * fb[j] for j in range(3)), Fraction(0)) for i in range(3)]
    assert abs(float(sum(fb)) - 1.0) <= 4e-16
    # Q b = lambda 1 up to the rounding of b to float64 (eps |b_j| |M_ij| per term)
    tol = 4e-16 * float((np.abs(q) @ np.abs(b)).max())
    assert max(abs(float(x - lam[1])) for x in lam) <= tol
    assert value == pytest.approx(float(sum(f * x for f, x in zip(fb, lam))), rel=1e-6)
    assert _exact_affine(np.ones((2, 2))) is None  # duplicates: singular bordered system
    assert _exact_affine(-np.eye(2)) is None  # a negative value: indefinite (round-off)


# ---------------------------------------------------------------------- properties
@given(gradient_matrices())
def test_simplex_and_kkt(g: np.ndarray) -> None:
    m = g @ g.T
    alpha = solve(g)
    assert_on_simplex(alpha)
    assert_kkt(m, alpha)


@given(gradient_matrices())
def test_exact_duplicates_get_equal_weights(g: np.ndarray) -> None:
    alpha = solve(g)
    k = g.shape[0]
    for i, j in itertools.combinations(range(k), 2):
        if np.array_equal(g[i], g[j]):
            assert alpha[i] == alpha[j], (i, j, alpha)


@given(independent_matrices(max_k=6), st.integers(0, 10**6))
def test_duplicating_a_row_splits_its_weight(g: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    j = int(rng.integers(0, g.shape[0]))
    alpha = solve(g)
    alpha_dup = solve(np.vstack([g, g[j : j + 1]]))
    assert alpha_dup[j] == alpha_dup[-1]
    merged = alpha_dup[:-1].copy()
    merged[j] += alpha_dup[-1]
    np.testing.assert_allclose(merged, alpha, atol=1e-6, rtol=0)


@given(independent_matrices(), st.randoms(use_true_random=False))
def test_permutation_equivariance_of_alpha(g: np.ndarray, rnd) -> None:  # noqa: ANN001
    perm = list(range(g.shape[0]))
    rnd.shuffle(perm)
    alpha = solve(g)
    alpha_perm = solve(g[perm])
    np.testing.assert_allclose(alpha_perm, alpha[perm], atol=1e-6, rtol=0)


@given(gradient_matrices(), st.randoms(use_true_random=False))
def test_permutation_equivariance_of_direction(g: np.ndarray, rnd) -> None:  # noqa: ANN001
    """d = sum alpha_k g_k is unique even where alpha is not (dependent rows, duplicates)."""
    perm = list(range(g.shape[0]))
    rnd.shuffle(perm)
    m = g @ g.T
    alpha = solve(g)
    alpha_perm = solve(g[perm])
    diff = np.empty_like(alpha)
    diff[perm] = alpha_perm  # back to the original order
    diff -= alpha
    gap = float(diff @ m @ diff)  # |d_perm - d|^2 through the Gram matrix
    assert gap <= 1e-10 * float(np.max(np.diag(m))) + 1e-300, gap


@given(gradient_matrices(), st.integers(-40, 40))
def test_scale_invariance_power_of_two_is_exact(g: np.ndarray, e: int) -> None:
    m = g @ g.T
    alpha = min_norm_weights(torch.from_numpy(m)).numpy()
    alpha_scaled = min_norm_weights(torch.from_numpy(m * 2.0**e)).numpy()
    np.testing.assert_array_equal(alpha_scaled, alpha)


@given(independent_matrices(), st.floats(-6.0, 6.0))
def test_scale_invariance_of_alpha(g: np.ndarray, e: float) -> None:
    m = g @ g.T
    c = 10.0**e
    alpha = min_norm_weights(torch.from_numpy(m)).numpy()
    alpha_scaled = min_norm_weights(torch.from_numpy(c * m)).numpy()
    np.testing.assert_allclose(alpha_scaled, alpha, atol=1e-6, rtol=0)


@given(gradient_matrices(), st.floats(-6.0, 6.0))
def test_scale_invariance_of_direction(g: np.ndarray, e: float) -> None:
    """With dependent rows alpha is fixed only by the ridge; d is unique and scale invariant."""
    m = g @ g.T
    alpha = min_norm_weights(torch.from_numpy(m)).numpy()
    alpha_scaled = min_norm_weights(torch.from_numpy(10.0**e * m)).numpy()
    diff = alpha_scaled - alpha
    assert float(diff @ m @ diff) <= 1e-10 * float(np.max(np.diag(m))) + 1e-300


@given(gradient_matrices(max_k=4))
def test_matches_brute_force_oracle(g: np.ndarray) -> None:
    """Adversarial inputs. Rows closer than ~1e-6 relative (|g_i - g_j|^2 <= 1e-12 (|g_i|^2 +
    |g_j|^2)) are merged as duplicates and split their weight, which costs up to ~1e-6 relative
    in the objective (and in d); hence the tolerance here. Generic inputs: 1e-9 (below)."""
    m = g @ g.T
    s = float(np.max(np.diag(m)))
    assume(s > 0)
    alpha = solve(g)
    best, _ = oracle(m / s)
    assert float(alpha @ (m / s) @ alpha) <= best + 1e-6


@pytest.mark.parametrize("degenerate", [False, True])
def test_matches_brute_force_oracle_random(degenerate: bool) -> None:
    rng = np.random.default_rng(1234 + degenerate)
    for _ in range(150):
        k = int(rng.integers(2, 5))
        g = random_matrix(rng, k, degenerate)
        m = g @ g.T
        s = float(np.max(np.diag(m)))
        best, best_alpha = oracle(m / s)
        for ridge in (1e-12, 0.0):
            alpha = solve(g, ridge=ridge)
            value = float(alpha @ (m / s) @ alpha)
            assert value <= best + 1e-9, (ridge, value, best)
            assert value >= best - 1e-9, (ridge, value, best)  # the oracle is the true minimum
        if g.shape[1] >= k and np.linalg.cond(g) < 1e4:
            # a well-conditioned unique minimiser. The default ridge (1e-12 relative) biases
            # alpha where the optimum is tiny (|d|^2 ~ 1e-11 max |g_k|^2), so compare the
            # unregularised solve
            np.testing.assert_allclose(alpha, best_alpha, atol=1e-6, rtol=0)


def test_larger_k_random_kkt() -> None:
    """K up to 8 with K > D (dependent rows) and opposite pairs: KKT holds, no cycling."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        k = int(rng.integers(5, 9))
        g = random_matrix(rng, k, degenerate=True)
        alpha = solve(g)
        assert_on_simplex(alpha)
        assert_kkt(g @ g.T, alpha)


def test_max_iter_caps_iterations() -> None:
    g = np.random.default_rng(0).standard_normal((8, 12))
    alpha = solve(g, max_iter=1)
    assert_on_simplex(alpha)  # still a valid simplex point, if not optimal


# ---------------------------------------------------------------------- simplex projection
@pytest.mark.parametrize(
    ("y", "expected"),
    [
        ([0.8, 0.8], [0.5, 0.5]),
        ([2.0, 0.0], [1.0, 0.0]),
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
        ([-1.0, -1.0, -1.0], [1 / 3, 1 / 3, 1 / 3]),
        ([5.0], [1.0]),
    ],
)
def test_project_simplex_cases(y: list[float], expected: list[float]) -> None:
    out = project_simplex(torch.tensor(y, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=10))
def test_project_simplex_properties(y: list[float]) -> None:
    t = torch.tensor(y, dtype=torch.float64)
    p = project_simplex(t)
    assert (p >= 0).all()
    assert abs(float(p.sum()) - 1.0) < 1e-9
    # idempotent, and optimal: p = max(y - tau, 0) for one threshold tau
    assert float((project_simplex(p) - p).abs().max()) <= 1e-9
    support = p > 0
    tau = t[support] - p[support]
    assert float(tau.max() - tau.min()) < 1e-9 * (1 + float(t.abs().max()))
    assert bool((t[~support] <= tau.mean() + 1e-9 * (1 + float(t.abs().max()))).all())


@pytest.mark.parametrize("y", [torch.zeros(2, 2), torch.zeros(0)])
def test_project_simplex_bad_input(y: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="1-D"):
        project_simplex(y)


# ---------------------------------------------------------------------- warm start
@pytest.mark.parametrize("degenerate", [False, True])
def test_warm_start_gives_the_cold_start_optimum(degenerate: bool) -> None:
    """Wolfe's method started from the drop-the-negatives corral ends at the same point as from
    a single vertex, whatever the support size (full, a few points dropped, a small face)."""
    from balancers._min_norm import _warm_start, _wolfe_run

    rng = np.random.default_rng(7 + degenerate)
    sizes = set()
    for _ in range(300):
        k = int(rng.integers(3, 17))
        if degenerate:
            g = random_matrix(rng, min(k, 8), True)
        else:
            d = int(rng.integers(k, 3 * k))
            common = rng.uniform(0.0, 1.0) * rng.standard_normal(d)
            g = rng.standard_normal((k, d)) + common
        q = g @ g.T
        s = float(np.max(np.diag(q)))
        if s == 0.0:
            continue
        q = q / s + 1e-12 * np.eye(q.shape[0])
        warm, _ = _wolfe_run(q, 50 * k + 100, 1e-14)
        cold, _ = _wolfe_run(q, 50 * k + 100, 1e-14, warm=False)
        assert_on_simplex(warm)
        np.testing.assert_allclose(warm @ q @ warm, cold @ q @ cold, rtol=1e-9, atol=1e-14)
        if not degenerate:  # dependent rows: alpha is unique only up to the ridge's conditioning
            np.testing.assert_allclose(warm, cold, atol=1e-9)
        start = _warm_start(q)
        if start is not None:
            assert (start[1] > 0).all()
            sizes.add(len(start[0]) == q.shape[0])
    if not degenerate:
        assert sizes == {True, False}  # both the full-support and the dropped-points cases ran
