"""Property assertions shared by the tests (import with ``from _asserts import ...``).

All checks work on the Gram matrix ``M = G G^T`` of the task gradients and on coefficients
``c`` of the combined direction ``d = sum_k c_k g_k``, so ``g_k . d = (M c)_k`` and
``|d|^2 = c^T M c``. Quantities that decide a check are evaluated in exact rational arithmetic
(:class:`fractions.Fraction` of the float64 inputs), so the only tolerances are the stated
relative one and the round-off of the quantities themselves in float64: ``g_k . d`` computed
from the vectors is exact only to ``~K eps |g_k| sum_j |c_j| |g_j|`` (and a float64 Gram matrix
is exact only to ``~D eps |g_i| |g_j|`` per entry), so that is the allowance
(``ROUNDING`` times it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = [
    "EPS",
    "ROUNDING",
    "assert_finite",
    "assert_min_norm_kkt",
    "assert_no_conflict",
    "assert_on_simplex",
    "assert_permutation_equivariant",
    "exact_min_norm",
    "min_norm_gaps",
    "permute_gram",
]

EPS = float(np.finfo(np.float64).eps)
#: multiples of ``K eps (|M| |c|)_k`` granted for round-off in the KKT and non-conflict checks
ROUNDING = 8.0


def assert_finite(*arrays: Any) -> None:
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        assert np.isfinite(a).all(), a


def assert_on_simplex(alpha: Any, atol: float | None = None) -> None:
    """``alpha >= 0`` and ``sum alpha = 1`` (to ``atol``, default ``4 K eps``)."""
    a = np.asarray(alpha, dtype=np.float64)
    tol = 4 * a.size * EPS if atol is None else atol
    assert np.isfinite(a).all(), a
    assert (a >= 0).all(), a
    assert abs(float(a.sum()) - 1.0) <= tol, float(a.sum())


def _exact(m: np.ndarray) -> list[list[Fraction]]:
    k = m.shape[0]
    return [[Fraction(float(m[i, j])) for j in range(k)] for i in range(k)]


def min_norm_gaps(m: np.ndarray, alpha: Any) -> tuple[list[Fraction], Fraction, np.ndarray]:
    """Exact ``(M alpha)_k - alpha^T M alpha`` for every k, the exact value ``alpha^T M alpha``
    and the round-off allowance ``ROUNDING K eps (|g_k| + s) s`` with ``s = sum_j |alpha_j| |g_j|``:
    the round-off of ``g_k . d`` and ``|d|^2`` computed from the vectors, which bounds that of the
    Gram entries themselves (``|delta M_ij| <~ D eps |g_i| |g_j|``)."""
    a = np.asarray(alpha, dtype=np.float64)
    k = m.shape[0]
    mm = _exact(m)
    fa = [Fraction(float(x)) for x in a]
    m_alpha = [sum((mm[i][j] * fa[j] for j in range(k)), Fraction(0)) for i in range(k)]
    value = sum((fa[i] * m_alpha[i] for i in range(k)), Fraction(0))
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    size = float(np.abs(a) @ norms)  # sum_j |alpha_j| |g_j|
    allowance = ROUNDING * k * EPS * (norms + size) * size
    return [x - value for x in m_alpha], value, allowance


def assert_min_norm_kkt(m: np.ndarray, alpha: Any, rtol: float = 1e-6) -> None:
    """The KKT conditions of ``min_{alpha in simplex} alpha^T M alpha`` in relative form.

    For ``d = sum_k alpha_k g_k``: ``g_k . d >= |d|^2 (1 - rtol)`` for every k, and
    ``|g_k . d - |d|^2| <= rtol |d|^2`` where ``alpha_k > 0``, each up to the round-off
    allowance of :func:`min_norm_gaps`. ``alpha`` must be on the simplex. When ``|d|^2`` is
    below the resolution of the Gram matrix (``ROUNDING K eps (sum_k alpha_k |g_k|)^2``), ``d`` is
    zero to working precision (Pareto-stationary) and only the simplex is checked.
    """
    assert_on_simplex(alpha)
    gaps, value, allowance = min_norm_gaps(m, alpha)
    a = np.asarray(alpha, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    resolution = ROUNDING * len(a) * EPS * float(a @ norms) ** 2
    if abs(float(value)) <= resolution:
        # |d|^2 below what a float64 Gram matrix resolves (round-off of alpha^T M alpha is
        # ~eps (sum_k alpha_k |g_k|)^2): d = 0 to working precision, a Pareto-stationary point;
        # the direction of d, hence the relative KKT gaps, is round-off
        return
    for k, gap in enumerate(gaps):
        slack = rtol * abs(float(value)) + float(allowance[k])
        assert float(gap) >= -slack, ("KKT inequality", k, float(gap), float(value), slack)
        if a[k] > 0:
            assert abs(float(gap)) <= slack, ("KKT equality", k, float(gap), float(value), slack)


def assert_no_conflict(m: np.ndarray, c: Any, rtol: float = 1e-9) -> None:
    """``g_k . d >= -tol_k`` for every task k, with ``d = sum_j c_j g_j`` and the scale-aware
    ``tol_k = rtol |g_k| sum_j |c_j| |g_j|`` (Cauchy-Schwarz bound of the terms of ``g_k . d``)."""
    cc = np.asarray(c, dtype=np.float64)
    k = m.shape[0]
    mm = _exact(m)
    fc = [Fraction(float(x)) for x in cc]
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    size = float(np.abs(cc) @ norms)
    for i in range(k):
        dot = sum((mm[i][j] * fc[j] for j in range(k)), Fraction(0))
        tol = rtol * float(norms[i]) * size
        assert float(dot) >= -tol, ("conflict", i, float(dot), tol)


def permute_gram(m: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    """The Gram matrix of the gradients in the order ``perm`` (row i = task ``perm[i]``)."""
    p = np.asarray(perm)
    return np.ascontiguousarray(m[np.ix_(p, p)])


def assert_permutation_equivariant(
    fn: Callable[[np.ndarray], np.ndarray],
    m: np.ndarray,
    perm: Sequence[int],
    *,
    rtol: float = 1e-9,
    atol: float = 0.0,
) -> None:
    """``fn(M[perm][:, perm]) == fn(M)[perm]`` (to ``atol + rtol max |fn(M)|``); ``fn`` maps a
    Gram matrix to per-task values (weights, coefficients)."""
    base = np.asarray(fn(m), dtype=np.float64)
    moved = np.asarray(fn(permute_gram(m, perm)), dtype=np.float64)
    tol = atol + rtol * float(np.abs(base).max(initial=0.0))
    diff = np.abs(moved - base[..., np.asarray(perm)])
    assert float(diff.max(initial=0.0)) <= tol, (base, moved, list(perm))


def _solve_exact(a: list[list[Fraction]], b: list[Fraction]) -> list[Fraction] | None:
    """Gauss-Jordan elimination in exact arithmetic; None for a singular system."""
    n = len(a)
    rows = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = next((r for r in range(col, n) if rows[r][col] != 0), None)
        if piv is None:
            return None
        rows[col], rows[piv] = rows[piv], rows[col]
        p = rows[col][col]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                f = rows[r][col] / p
                rows[r] = [x - f * y for x, y in zip(rows[r], rows[col])]
    return [rows[i][n] / rows[i][i] for i in range(n)]


def exact_min_norm(m: np.ndarray) -> tuple[Fraction, list[Fraction]] | None:
    """The exact minimum of ``alpha^T M alpha`` on the simplex for the float64 matrix ``M``.

    Exhaustive active-set solve in rational arithmetic (meant for ``K <= 5``): for every support
    ``S`` with a non-singular bordered system, the affine minimiser; the optimum is the feasible
    one (``alpha_S >= 0``) satisfying every KKT inequality ``(M alpha)_j >= alpha^T M alpha``.
    ``None`` when no support qualifies (degenerate sets whose optimal supports are all
    singular).
    """
    k = m.shape[0]
    mm = _exact(m)
    best: tuple[Fraction, list[Fraction]] | None = None
    one, zero = Fraction(1), Fraction(0)
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            a = [[mm[i][j] for j in s] + [one] for i in s] + [[one] * size + [zero]]
            sol = _solve_exact(a, [zero] * size + [one])
            if sol is None or any(x < 0 for x in sol[:size]):
                continue
            alpha = [zero] * k
            for i, x in zip(s, sol[:size]):
                alpha[i] = x
            m_alpha = [sum((mm[i][j] * alpha[j] for j in range(k)), zero) for i in range(k)]
            value = sum((alpha[i] * m_alpha[i] for i in range(k)), zero)
            if all(x >= value for x in m_alpha) and (best is None or value < best[0]):
                best = (value, alpha)
    return best
