"""Exact min-norm point of the convex hull of task gradients, from their Gram matrix.

Solves MGDA's subproblem (Sener & Koltun 2018, Eq. 3)::

    alpha* = argmin_{alpha in simplex} alpha^T M alpha ,   M = G G^T

with Wolfe's min-norm-point algorithm (Wolfe 1976) written on the Gram matrix, and the closed
form (Eq. 4) for two tasks. Wolfe's method is an active-set method: it terminates in finitely many
steps with the exact optimum (up to float64 round-off), unlike Frank-Wolfe, whose usual
tolerances leave KKT gaps of order one on inputs whose optimum lies on a face of the simplex.

Scale awareness (task gradient norms may differ by many orders of magnitude):

* the input is scaled by a power of two (exact) so that ``max_k M_kk`` is in ``[1, 4)``;
* every affine sub-problem of Wolfe's method is solved in Jacobi-scaled coordinates, on the
  unit-diagonal matrix ``C = D^-1/2 M D^-1/2`` (``D = diag M``) with the constraint written on the
  contributions ``beta_k = alpha_k |g_k|``, so its conditioning depends on the angles between the
  gradients and not on their norms;
* the optimality test and the support decisions are relative: ``(M alpha)_j >= alpha^T M alpha``
  up to ``tol * alpha^T M alpha`` plus the round-off of the products themselves, and a task
  leaves the support when its contribution ``alpha_k |g_k|`` is below round-off of the largest;
* the Jacobi scaling cannot tell two nearly opposite gradients (``g_j ~ -g_i (1 + 1e-8)``) from
  exactly opposite ones, although ``M_ii + M_jj + 2 M_ij = |g_i + g_j|^2`` still resolves their
  sum, which a third, tiny gradient can make the optimum use: when the float run ends with a
  violated optimality test, Wolfe's method is rerun with every affine sub-problem solved in exact
  rational arithmetic on the float64 Gram entries, and the result that passes is kept.

Exactly zero gradients: if some task's gradient is zero (``M_kk = 0``) the min-norm point is
``d = 0``; those tasks share the weight equally and the others get 0. All zero: uniform weights.
Exactly opposite gradients (``M_ij < 0`` and ``M_ij^2 >= M_ii M_jj`` in exact arithmetic on the
float64 entries, e.g. ``g_j = -g_i`` or ``g_j = -2 g_i``): the pair reaches ``d = 0`` on its own
(``alpha_i |g_i| = alpha_j |g_j|``); every such pair gets the same share of the weight.

Uniqueness: when gradients are linearly dependent the optimal ``alpha`` is not unique although
``d = G^T alpha`` is. Tasks with identical gradients are merged before the solve and share their
weight equally (kept only if the merged solution passes the KKT test of the original problem).
Other ties are broken by a second solve of ``alpha^T (M + rho I) alpha`` with
``rho = ridge * |d*|^2`` relative to the optimal value of the first solve: it selects
(approximately) the optimal ``alpha`` of least Euclidean norm and moves the relative KKT gaps by
at most ``ridge``. The KKT conditions hold in relative form: for the returned ``alpha`` and
``d = sum_k alpha_k g_k``, ``g_j . d >= |d|^2 (1 - tol - ridge)`` for every task ``j`` up to the
round-off of the products ``alpha_k M_jk``, with equality on the support.

Layout: this module holds the entry point and what surrounds the solve (the power-of-two
scaling, zero, opposite and duplicate gradients, the closed form for two tasks, the ridge
tie-break); Wolfe's method is in :mod:`._min_norm_wolfe`, its affine sub-problems in
:mod:`._min_norm_affine`, and the simplex projection (re-exported here) in :mod:`._simplex`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from ._host import check_gram, host_array
from ._min_norm_affine import _EPS, _Problem
from ._min_norm_affine import _SUPPORT_RTOL as _SUPPORT_RTOL
from ._min_norm_affine import _affine_minimizer as _affine_minimizer
from ._min_norm_affine import _exact_affine as _exact_affine
from ._min_norm_affine import _support as _support
from ._min_norm_wolfe import _checked_wolfe
from ._min_norm_wolfe import _refine as _refine
from ._min_norm_wolfe import _warm_start as _warm_start
from ._min_norm_wolfe import _wolfe_run as _wolfe_run
from ._simplex import _project_simplex_np as _project_simplex_np
from ._simplex import project_simplex

__all__ = ["min_norm_weights", "project_simplex"]


def _two_task(q: np.ndarray) -> np.ndarray:
    """Closed form for K = 2 (Sener & Koltun, Eq. 4): weight on task 1 clipped to [0, 1].

    Both weights are computed from their own numerator (``(M_22 - M_12)/den`` and
    ``(M_11 - M_12)/den``), so a tiny weight on a huge gradient keeps its relative precision
    instead of being ``1 - (1 - tiny)``. Identical gradients (``den <= 0``): ``(1/2, 1/2)``.
    """
    a, b, c = float(q[0, 0]), float(q[1, 1]), float(q[0, 1])
    denom = a + b - 2.0 * c
    if denom <= 0.0:
        return np.array([0.5, 0.5])
    if c >= a:
        return np.array([1.0, 0.0])
    if c >= b:
        return np.array([0.0, 1.0])
    return np.array([(b - c) / denom, (a - c) / denom])


def _duplicate_groups(q: np.ndarray, rtol: float = 1e-12) -> list[list[int]]:
    """Tasks whose gradients coincide (``|g_i - g_j|^2 <= rtol (|g_i|^2 + |g_j|^2)``)."""
    k = q.shape[0]
    d = q.diagonal()
    total = d[:, None] + d[None, :]
    same = total - 2.0 * q <= rtol * total
    np.fill_diagonal(same, False)
    if not same.any():
        return [[i] for i in range(k)]
    groups: list[list[int]] = []
    assigned = np.zeros(k, dtype=bool)
    for i in range(k):
        if assigned[i]:
            continue
        members = [i] + [j for j in range(i + 1, k) if not assigned[j] and same[i, j]]
        assigned[members] = True
        groups.append(members)
    return groups


def _solve(q: np.ndarray, max_iter: int, tol: float, ridge: float) -> np.ndarray:
    """The min-norm weights of a Gram matrix with a positive diagonal (no merging)."""
    k = q.shape[0]
    if k == 1:
        return np.ones(1)
    if k == 2:
        return _two_task(q)
    prob = _Problem(q)
    alpha = _checked_wolfe(prob, max_iter, tol)
    if ridge > 0.0:
        gap, slack, value = prob.gaps(alpha, tol)
        if value > 0.0 and ((alpha == 0.0) & (gap <= slack)).any():
            # a task off the support is tight: alpha may not be unique. Tie-break: the optimal
            # alpha of (approximately) least norm, with a ridge relative to |d*|^2
            alpha = _checked_wolfe(
                _Problem(q + ridge * value * np.eye(k)),
                max_iter,
                tol,
                support=np.flatnonzero(alpha),
                refine=False,
            )
    return alpha


def _kkt_holds(q: np.ndarray, alpha: np.ndarray, rtol: float) -> bool:
    """The relative KKT test of the min-norm problem, with round-off slack (see _Problem.gaps):
    ``gap >= -slack`` for every task and ``gap <= slack`` on the support (the inequalities alone
    let a task of tiny weight keep a large positive gap, balanced by round-off-sized negative
    gaps of the heavy ones)."""
    gap, slack, _ = _Problem(q).gaps(alpha, rtol)
    return bool((gap >= -slack).all() and (gap[alpha > 0] <= slack[alpha > 0]).all())


def _opposite_pairs(q: np.ndarray) -> np.ndarray | None:
    """Weights with ``d = 0`` from the exactly opposite pairs of gradients, or ``None``.

    A pair with ``M_ij < 0`` and ``M_ij^2 >= M_ii M_jj`` (decided in exact arithmetic on the float64
    entries) is collinear and opposite: its two-task optimum
    ``(M_jj - M_ij, M_ii - M_ij) / (M_ii + M_jj - 2 M_ij)`` has the value
    ``(M_ii M_jj - M_ij^2) / (M_ii + M_jj - 2 M_ij) <= 0``, the minimum (``d = 0``). Every such
    pair gets the same share, so the weights do not depend on the task order. The float solve
    cannot certify this optimum when tiny gradients sit next to the pair (the round-off of
    ``g_k . d`` for the pair's gradients exceeds ``|d|^2`` of a point built from the tiny ones).
    """
    diag = q.diagonal()
    # candidates: M_ij |M_ij| <= -M_ii M_jj up to round-off (the exact test follows)
    test = q * np.abs(q)
    test += np.outer(diag, diag * (1.0 - 8.0 * _EPS))
    if float(test.min()) > 0.0:
        return None
    rows, cols = np.nonzero(test <= 0.0)
    pairs = [
        (i, j)
        for i, j in zip(rows.tolist(), cols.tolist())
        if i < j
        and q[i, j] < 0.0
        and Fraction(float(q[i, j])) ** 2 >= Fraction(float(diag[i])) * Fraction(float(diag[j]))
    ]
    if not pairs:
        return None
    alpha = np.zeros(q.shape[0])
    for i, j in pairs:
        alpha[[i, j]] += _two_task(q[np.ix_([i, j], [i, j])])
    out: np.ndarray = alpha / float(alpha.sum())
    return out


def min_norm_weights(
    gram: Tensor | np.ndarray,
    *,
    max_iter: int | None = None,
    tol: float = 1e-14,
    ridge: float = 1e-9,
) -> Tensor:
    """Weights ``alpha`` on the simplex minimising ``|| sum_k alpha_k g_k ||^2``.

    Args:
        gram: ``(K, K)`` Gram matrix ``M_ij = <g_i, g_j>`` (symmetric positive semi-definite).
        max_iter: cap on Wolfe's major iterations (default ``50 * K + 100``; the method
            terminates long before on every input we have seen).
        tol: relative tolerance of the optimality test
            ``(M alpha)_j >= alpha^T M alpha (1 - tol)`` (plus the round-off of the products).
        ridge: relative tie-break (see the module docstring): a second solve with
            ``M + ridge |d*|^2 I`` picks the optimal alpha of least norm among near-ties; it
            moves the relative KKT gaps by at most ``ridge``. ``0`` disables it.

    Returns:
        ``(K,)`` float64 tensor on the simplex. A zero gradient takes all the weight (``d = 0``);
        all-zero gradients give uniform weights; exactly opposite pairs of gradients share it
        (``d = 0``, see the module docstring).

    The KKT conditions of the min-norm problem are ``(M alpha)_i >= alpha^T M alpha`` for all
    ``i``, with equality where ``alpha_i > 0``.
    """
    return torch.from_numpy(
        _min_norm_weights_np(check_gram(host_array(gram)), max_iter=max_iter, tol=tol, ridge=ridge)
    )


def _min_norm_weights_np(
    m: np.ndarray, *, max_iter: int | None = None, tol: float = 1e-14, ridge: float = 1e-9
) -> np.ndarray:
    """:func:`min_norm_weights` on a validated, symmetric float64 host Gram matrix."""
    k = m.shape[0]
    if max_iter is None:
        max_iter = 50 * k + 100
    diag = np.diag(m)
    zero = ~(diag > 0.0)
    if k == 1:
        return np.ones(1)
    if zero.any():  # d = 0 exactly: the zero gradients share the weight
        return zero / float(zero.sum())
    # an exact power-of-two scaling: the result is invariant to 2^e M bit for bit
    q = np.ldexp(m, -int(np.frexp(float(diag.max()))[1]))
    opposite = _opposite_pairs(q)
    if opposite is not None:  # d = 0 exactly with pairs of opposite gradients
        return opposite
    groups = _duplicate_groups(q)
    alpha: np.ndarray | None = None
    if len(groups) < k:
        reps = [g[0] for g in groups]
        ar = _solve(q[np.ix_(reps, reps)], max_iter, tol, ridge)
        merged = np.zeros(k)
        for g, a in zip(groups, ar):
            merged[g] = a / len(g)  # duplicates share their weight equally
        merged = np.clip(merged, 0.0, None)
        merged /= merged.sum()
        if _kkt_holds(q, merged, max(1e3 * tol, 1e-9) + ridge):
            alpha = merged
    if alpha is None:
        alpha = _solve(q, max_iter, tol, ridge)
    out: np.ndarray = np.clip(alpha, 0.0, None)
    out /= out.sum()
    return out
