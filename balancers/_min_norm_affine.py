"""The affine sub-problems of Wolfe's min-norm-point method, on a scaled Gram matrix.

Each minor cycle of Wolfe's method (:mod:`._min_norm_wolfe`) needs the minimiser of
``b^T Q_S b`` on ``sum b = 1`` over its corral ``S``. :func:`_affine_minimizer` solves it in
Jacobi-scaled coordinates (one ``eigh`` of the unit-diagonal matrix, so the conditioning depends
on the angles between the gradients and not on their norms); :func:`_exact_affine` solves it in
exact rational arithmetic on the float64 entries, for the nearly opposite gradients the scaled
solve cannot tell apart. :class:`_Problem` holds the scaled Gram matrix shared by the solves and
the relative optimality test (:meth:`_Problem.gaps`) of the min-norm problem.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

#: float64 machine epsilon (2^-52)
_EPS = float(np.finfo(np.float64).eps)
#: contributions ``alpha_k |g_k|`` below this fraction of the largest count as zero
_SUPPORT_RTOL = 1e-15


def _affine_minimizer(c_s: np.ndarray, n_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmin of ``b^T Q_S b`` on ``sum b = 1`` (``Q_S = N C_S N``, ``N = diag n_s``).

    Solved in the contributions ``beta = N b`` (Jacobi scaling): minimise ``beta^T C_S beta`` on
    ``w^T beta = 1`` with ``w = 1/n_s``, from one ``eigh`` of the unit-diagonal ``C_S``.
    Eigenvalues below ``4 |S| eps lambda_max`` form the numerical null space ``N``:

    * ``w`` has a component in ``N`` beyond round-off: the affine hull of the corral contains a
      null combination (``d = 0`` reachable); ``beta = P_N w`` (exact in exact arithmetic);
    * otherwise ``beta = C_S^+ w`` (the pseudo-inverse on the range): the exact answer for a
      non-singular ``C_S``, and the minimiser of least norm when the corral is affinely
      dependent.

    Returns ``(b, beta)``: the barycentric weights (summing to one) and the contributions scaled
    to ``max |beta| = 1``; NaNs when no minimiser is found (a numerically empty problem).
    """
    m = n_s.shape[0]
    if m == 1:
        return np.ones(1), np.ones(1)
    w = (1.0 / n_s) * float(n_s.min())  # in (0, 1], max 1
    lam, vec = np.linalg.eigh(c_s)
    null = lam <= 4.0 * m * _EPS * max(float(lam[-1]), 1.0)
    coef = vec.T @ w
    if null.any() and float(np.linalg.norm(coef[null])) > 4.0 * m * _EPS * float(np.linalg.norm(w)):
        beta = vec[:, null] @ coef[null]
    else:
        beta = vec[:, ~null] @ (coef[~null] / lam[~null])
    top = float(np.abs(beta).max()) if beta.size else 0.0
    if not np.isfinite(top) or top == 0.0:
        return np.full(m, np.nan), np.full(m, np.nan)
    beta = beta / top
    b = w * beta
    total = float(b.sum())
    if not total > 0.0:
        return np.full(m, np.nan), np.full(m, np.nan)
    return b / total, beta


def _support(beta: np.ndarray) -> np.ndarray:
    """Entries whose contribution is positive beyond round-off of the largest one."""
    return beta > _SUPPORT_RTOL * float(np.abs(beta).max())


def _exact_affine(q_s: np.ndarray) -> tuple[np.ndarray, float] | None:
    """argmin of ``b^T Q_S b`` on ``sum b = 1`` in exact rational arithmetic on the float64 entries.

    The bordered system ``[[Q_S, 1], [1^T, 0]] (b, t) = (0, 1)`` is solved by fraction-free
    (Bareiss) elimination on the integers ``2^E Q_S`` (every float64 is a dyadic rational), then
    ``b`` is rounded to float64 (correctly, component by component); returns ``b`` and the value
    ``b^T Q_S b`` of the exact solution. Used where the Jacobi-scaled float solve cannot resolve
    the sub-problem: two nearly opposite (or parallel) gradients whose normalised directions
    agree to round-off, while the Gram entries themselves still carry
    ``|g_i + g_j|^2 = M_ii + M_jj + 2 M_ij`` (see :func:`_checked_wolfe`). ``None`` when the
    system is singular or the stationary point has a negative value (``Q_S`` indefinite:
    round-off of a rank-deficient Gram matrix), where the float solve is the right one.
    """
    m = q_s.shape[0]
    ratios = [float(x).as_integer_ratio() for x in q_s.ravel()]
    den = max(r[1] for r in ratios)  # powers of two: every denominator divides the largest
    ints = [num * (den // d) for num, d in ratios]  # 2^E Q_S, E = log2(den)
    # rows [2^E Q_S | 2^E | 0] and [1 ... 1 | 0 | 1]: 2^E (Q_S b + t 1) = 0, sum b = 1
    rows = [ints[i * m : (i + 1) * m] + [den, 0] for i in range(m)]
    rows.append([1] * m + [0, 1])
    n = m + 1
    prev = 1
    for k in range(n):  # Bareiss: every division below is exact
        piv = next((r for r in range(k, n) if rows[r][k] != 0), None)
        if piv is None:
            return None
        rows[k], rows[piv] = rows[piv], rows[k]
        pk = rows[k]
        for i in range(k + 1, n):
            ri = rows[i]
            f = ri[k]
            for j in range(k + 1, n + 1):
                ri[j] = (ri[j] * pk[k] - f * pk[j]) // prev
            ri[k] = 0
        prev = pk[k]
    x: list[Fraction] = [Fraction(0)] * n
    for i in range(n - 1, -1, -1):
        acc = Fraction(rows[i][n]) - sum((rows[i][j] * x[j] for j in range(i + 1, n)), Fraction(0))
        x[i] = acc / rows[i][i]
    if x[m] > 0:  # the value b^T Q_S b = -t is negative: Q_S is indefinite
        return None
    try:
        return np.array([float(v) for v in x[:m]]), float(-x[m])
    except OverflowError:  # pragma: no cover - a numerically singular system
        return None


class _Problem:
    """The (power-of-two scaled) Gram matrix with its Jacobi scaling, shared by the solves."""

    def __init__(self, q: np.ndarray) -> None:
        self.q = q
        self.k = q.shape[0]
        self.n = np.sqrt(q.diagonal())
        self.c = q / np.outer(self.n, self.n)
        np.fill_diagonal(self.c, 1.0)
        self.abs_q = np.abs(q)

    def affine(self, corral: list[int], exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The corral's affine minimiser ``(b, beta)`` (see :func:`_affine_minimizer`).

        With ``exact``, also the rational solution (:func:`_exact_affine`), kept unless its exact
        value exceeds the float solution's (up to that one's round-off): on an indefinite ``Q_S``
        (round-off of dependent gradients) the stationary point need not be a minimiser.
        """
        idx = np.asarray(corral)
        b, beta = _affine_minimizer(self.c[np.ix_(idx, idx)], self.n[idx])
        if not exact or idx.size < 2:
            return b, beta
        q_s = self.q[np.ix_(idx, idx)]
        found = _exact_affine(q_s)
        if found is None:
            return b, beta
        b_ex, value = found
        if np.isfinite(b).all():
            bound = float(b @ q_s @ b) + 4.0 * idx.size * _EPS * float(b @ np.abs(q_s) @ np.abs(b))
            if not value <= bound:
                return b, beta
        contrib = b_ex * self.n[idx]
        top = float(np.abs(contrib).max())
        total = float(b_ex.sum())
        if not (np.isfinite(contrib).all() and top > 0.0 and total > 0.0):
            return b, beta  # pragma: no cover - numerical safety
        return b_ex / total, contrib / top

    def gaps(self, alpha: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, float]:
        """``((M alpha)_j - alpha^T M alpha, slack_j, alpha^T M alpha)``; optimal: gap >= -slack.

        ``slack_j = tol |alpha^T M alpha| + 4 K eps ((|M| alpha)_j + alpha^T |M| alpha)``: the
        relative tolerance plus the round-off of the products themselves.
        """
        x_dot = self.q @ alpha
        xx = float(alpha @ x_dot)
        rounding = 4.0 * self.k * _EPS * (self.abs_q @ alpha + float(alpha @ self.abs_q @ alpha))
        return x_dot - xx, tol * abs(xx) + rounding, xx
