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
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from ._host import check_gram, host_array

__all__ = ["min_norm_weights", "project_simplex"]

#: float64 machine epsilon (2^-52)
_EPS = float(np.finfo(np.float64).eps)
#: contributions ``alpha_k |g_k|`` below this fraction of the largest count as zero
_SUPPORT_RTOL = 1e-15


def project_simplex(y: Tensor | np.ndarray) -> Tensor:
    """Euclidean projection of a vector onto the probability simplex (Duchi et al. 2008).

    Sort ``y`` descending into ``u``, find the largest ``rho`` with
    ``u_rho - (sum_{j<=rho} u_j - 1)/rho > 0`` and return ``max(y - tau, 0)`` with
    ``tau = (sum_{j<=rho} u_j - 1)/rho``.

    A tensor is projected where it lives, without a host synchronisation (``rho`` stays a
    tensor), in its own dtype; a NumPy array goes through :func:`_project_simplex_np` and comes
    back as a CPU tensor.
    """
    if not isinstance(y, Tensor):
        return torch.from_numpy(_project_simplex_np(np.asarray(y)))
    if y.dim() != 1 or y.numel() == 0:
        raise ValueError(
            f"project_simplex expects a non-empty 1-D tensor, got shape {tuple(y.shape)}"
        )
    u, _ = torch.sort(y, descending=True)
    css = torch.cumsum(u, 0) - 1
    idx = torch.arange(1, y.numel() + 1, dtype=y.dtype, device=y.device)
    cond = u - css / idx > 0  # true exactly up to rho (cond[0] = (1 > 0) in exact arithmetic)
    rho = torch.where(cond, idx, torch.ones_like(idx)).amax()  # >= 1 even after round-off
    tau = css.gather(0, (rho - 1).to(torch.int64).reshape(1)) / rho
    return torch.clamp(y - tau, min=0)


def _project_simplex_np(y: np.ndarray) -> np.ndarray:
    """:func:`project_simplex` on the host (float64 unless ``y`` is already floating point)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"project_simplex expects a non-empty 1-D tensor, got shape {y.shape}")
    u = np.sort(y)[::-1]
    css = np.cumsum(u) - 1
    idx = np.arange(1, y.size + 1, dtype=y.dtype)
    rho = int(np.max(np.flatnonzero(u - css / idx > 0), initial=0)) + 1
    tau = css[rho - 1] / rho
    out: np.ndarray = np.clip(y - tau, 0, None)
    return out


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


def _warm_start(
    prob: _Problem | np.ndarray,
    support: np.ndarray | None = None,
    rounds: int = 4,
    exact: bool = False,
) -> tuple[list[int], np.ndarray] | None:
    """A starting corral for Wolfe's method: drop the points whose affine weight is not positive.

    Start from ``support`` (default: every point); the minimiser ``b`` of ``b^T Q_S b`` on
    ``sum b = 1`` is kept when ``b > 0`` (contributions above round-off); otherwise the points
    with ``b_i <= 0`` leave ``S`` and the solve is repeated (at most ``rounds`` times). A
    positive ``b`` is exactly the state Wolfe's method reaches after a minor cycle (the affine
    minimiser of its corral, in the corral's relative interior), so the major iterations continue
    from it with the same guarantees; when the optimum has full support (or loses only a few
    points) they stop at the first test.
    """
    if not isinstance(prob, _Problem):
        prob = _Problem(prob)
    idx = np.arange(prob.k) if support is None else np.asarray(support)
    for _ in range(rounds):
        if idx.size == 0:
            return None
        b, beta = prob.affine(idx.tolist(), exact)
        if not np.isfinite(b).all():
            return None
        positive = _support(beta)
        if positive.all():
            return idx.tolist(), b
        if not positive.any():
            return None
        idx = idx[positive]
    return None


def _wolfe_run(
    q: np.ndarray | _Problem,
    max_iter: int,
    tol: float,
    warm: bool = True,
    support: np.ndarray | None = None,
    exact: bool = False,
) -> tuple[np.ndarray, bool]:
    """Wolfe's min-norm-point algorithm on the Gram matrix ``q`` (positive diagonal).

    Major cycle: stop when every task passes the relative optimality test (:meth:`_Problem.gaps`);
    otherwise add the violating task with the largest exact line-search decrease
    ``(x.x - x.p_j)^2 / |x - p_j|^2`` (scale-free, unlike the classic ``argmin x.p_j``). Minor
    cycle: move to the corral's affine minimiser, or as far as the simplex allows and drop the
    task that reached zero. A major step whose ``|x|^2`` stays within round-off of the best is
    kept (a nearly flat direction may need several tasks before it pays off) but its task is not
    added again before a strict decrease; a step that increases ``|x|^2`` beyond round-off is
    undone. The search ends at a point that passes the test, or when no untried violator is left
    (or after ``max_iter`` major steps) with the best point found.

    ``exact``: solve the affine sub-problems in rational arithmetic (:meth:`_Problem.affine`).
    Returns ``(alpha, converged)``: ``converged`` is true when the search ended at a point that
    passes the test.
    """
    prob = q if isinstance(q, _Problem) else _Problem(q)
    q = prob.q
    k = prob.k
    start = _warm_start(prob, support, exact=exact) if warm else None
    if start is None:
        corral, lam = [int(np.argmin(q.diagonal()))], np.array([1.0])
    else:
        corral, lam = start
    best: tuple[float, list[int], np.ndarray] | None = None
    tried: set[int] = set()  # tasks whose addition to the best corral made no progress
    converged = False
    diag = q.diagonal()
    j = -1
    for _ in range(max_iter):
        alpha = np.zeros(k)
        alpha[corral] = lam
        gap, slack, xx = prob.gaps(alpha, tol)
        if best is None or xx < best[0]:
            best = (xx, list(corral), lam.copy())
            tried.clear()
        elif xx <= best[0] + 4.0 * k * _EPS * float(alpha @ prob.abs_q @ alpha):
            tried.add(j)  # no decrease beyond round-off: go on from here, but not with j again
        else:  # an increase (round-off in the minor cycle): back to the best corral
            tried.add(j)
            corral, lam = list(best[1]), best[2].copy()
            alpha = np.zeros(k)
            alpha[corral] = lam
            gap, slack, xx = prob.gaps(alpha, tol)
        violated = gap < -slack
        violated[corral] = False
        if not violated.any():
            converged = True  # optimal to round-off: keep this point (its |x|^2 may read
            break  # higher than an earlier one's: both are round-off at that level)
        violated[list(tried)] = False
        if not violated.any():
            break
        x_dot = q @ alpha
        dist2 = xx - 2.0 * x_dot + diag  # |x - p_j|^2
        safe = np.where(dist2 > 0, dist2, 1.0)
        gain = np.where(violated & (dist2 > 0), (xx - x_dot) ** 2 / safe, -1.0)
        j = int(np.argmax(gain))
        if not violated[j]:  # every violator at distance 0 (round-off): take the worst gap
            j = int(np.argmin(np.where(violated, gap + slack, np.inf)))
        corral.append(j)
        lam = np.append(lam, 0.0)
        for _minor in range(k + 1):
            b, beta = prob.affine(corral, exact)
            if not np.isfinite(b).all():
                break
            positive = _support(beta)
            if positive.all():
                lam = b
                break
            # move from lam towards b until the first coordinate hits zero
            ratios = np.full(b.shape, np.inf)
            ok = ~positive & (lam > b)
            ratios[ok] = lam[ok] / (lam[ok] - b[ok])
            theta = float(min(1.0, ratios.min()))
            lam = lam + theta * (b - lam)
            keep = _support(lam * prob.n[corral])
            if np.isfinite(ratios.min()):
                keep[int(np.argmin(ratios))] = False
            if not keep.any():  # pragma: no cover - numerical safety
                keep[int(np.argmax(lam * prob.n[corral]))] = True
            corral = [c for c, kp in zip(corral, keep) if kp]
            lam = lam[keep]
            lam = lam / lam.sum()
    if (
        not converged
        and best is not None
        and best[0] < float(lam @ q[np.ix_(corral, corral)] @ lam)
    ):
        corral, lam = best[1], best[2]
    alpha = np.zeros(k)
    alpha[corral] = lam
    return alpha, converged


def _refine(prob: _Problem, alpha: np.ndarray, steps: int = 3) -> np.ndarray:
    """Fixed-precision iterative refinement of the final affine solve on the support.

    The affine minimiser is solved through an eigendecomposition, which is accurate relative to
    the largest contribution only; a task whose contribution ``alpha_k |g_k|`` is many orders
    below the largest one (a huge gradient with a tiny weight) then keeps too few correct digits
    for its KKT condition. Refining ``C_S beta = lam w, w^T beta = 1`` (``beta`` the scaled
    contributions) with residuals computed in float64 makes every equation hold to the round-off
    of its own terms (Skeel 1980): componentwise backward stability. A step is kept only if it
    lowers the largest componentwise residual and keeps the support positive.
    """
    support = np.flatnonzero(alpha > 0)
    if support.size < 2:
        return alpha
    c = prob.c[np.ix_(support, support)]
    n = prob.n[support]
    n_min = float(n.min())
    w = n_min / n
    lam_c, vec = np.linalg.eigh(c)
    if not lam_c[0] > 4.0 * support.size * _EPS * float(lam_c[-1]):
        return alpha  # singular: d = 0 reachable, nothing to refine

    def solve(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = vec @ ((vec.T @ x) / lam_c)
        return out

    def residual(beta: np.ndarray, lam: float) -> tuple[np.ndarray, float, float]:
        c_beta = c @ beta
        r1 = lam * w - c_beta
        r2 = 1.0 - float(w @ beta)
        scale = np.abs(c) @ np.abs(beta) + abs(lam) * w
        worst = float(np.max(np.abs(r1) / np.where(scale > 0, scale, 1.0)))
        return r1, r2, worst

    beta = alpha[support] * n / n_min
    lam = float(beta @ c @ beta)
    r1, r2, worst = residual(beta, lam)
    c_inv_w = solve(w)
    w_c_inv_w = float(w @ c_inv_w)
    if not w_c_inv_w > 0:
        return alpha
    for _ in range(steps):
        if worst <= 2.0 * _EPS:
            break
        c_inv_r = solve(r1)
        d_lam = (r2 - float(w @ c_inv_r)) / w_c_inv_w
        new_beta = beta + c_inv_r + d_lam * c_inv_w
        new_lam = lam + d_lam
        if not (new_beta > 0).all():
            break
        nr1, nr2, new_worst = residual(new_beta, new_lam)
        if not new_worst < worst:
            break
        beta, lam, r1, r2, worst = new_beta, new_lam, nr1, nr2, new_worst
    out: np.ndarray = np.zeros_like(alpha)
    out[support] = beta * n_min / n
    out /= out.sum()
    return out


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


def _checked_wolfe(
    prob: _Problem,
    max_iter: int,
    tol: float,
    support: np.ndarray | None = None,
    refine: bool = True,
) -> np.ndarray:
    """Wolfe's method (refined), redone with exact affine solves when it ends unconverged.

    The float affine solves work in Jacobi-scaled coordinates, where two gradients whose
    normalised directions agree to round-off (``g_j ~ -g_i (1 + 1e-8)``) are indistinguishable
    (``C_ij = -1`` in float64), although the Gram entries still resolve their sum
    (``M_ii + M_jj + 2 M_ij = |g_i + g_j|^2``) and a third, tiny gradient can make the optimum use
    it. Wolfe's method then stops with a violator it cannot add (every attempt reads as an
    increase of ``|x|^2``); if its result fails the optimality test of :meth:`_Problem.gaps`, a
    second run solves every affine sub-problem exactly on the float64 Gram entries
    (:func:`_exact_affine`). The result that passes the test is kept (else the one of least
    ``alpha^T M alpha``). ``refine``: apply :func:`_refine` to Wolfe's result.
    """
    alpha, converged = _wolfe_run(prob, max_iter, tol, support=support)
    if refine:
        alpha = _refine(prob, alpha)
    if converged:
        return alpha
    gap, slack, value = prob.gaps(alpha, tol)
    if not (gap < -slack).any():
        return alpha
    best = (True, value, alpha)
    raw, _ = _wolfe_run(prob, max_iter, tol, support=support, exact=True)
    for cand in (_refine(prob, raw), raw) if refine else (raw,):
        gap, slack, value = prob.gaps(cand, tol)
        key = (bool((gap < -slack).any()), value, cand)
        if key[:2] < best[:2]:
            best = key
    return best[2]


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
