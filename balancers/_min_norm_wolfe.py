"""Wolfe's min-norm-point method on a Gram matrix (Wolfe 1976), with its safeguards.

An active-set method: major cycles add the task that violates the relative optimality test
most usefully, minor cycles move to the corral's affine minimiser (:mod:`._min_norm_affine`)
and drop the tasks that reach zero weight. Around it: a warm start that drops the points of
non-positive affine weight (:func:`_warm_start`), a componentwise iterative refinement of the
final affine solve (:func:`_refine`), and a rerun with exact rational affine solves when the
float run ends with a violated optimality test (:func:`_checked_wolfe`).
"""

from __future__ import annotations

import numpy as np

from ._min_norm_affine import _EPS, _Problem, _support


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
    corral, lam = _initial_corral(prob, warm, support, exact)
    best: tuple[float, list[int], np.ndarray] | None = None
    tried: set[int] = set()  # tasks whose addition to the best corral made no progress
    converged = False
    j = -1
    for _ in range(max_iter):
        alpha = _embed(k, corral, lam)
        gap, slack, xx = prob.gaps(alpha, tol)
        if best is None or xx < best[0]:
            best = (xx, list(corral), lam.copy())
            tried.clear()
        elif xx <= best[0] + 4.0 * k * _EPS * float(alpha @ prob.abs_q @ alpha):
            tried.add(j)  # no decrease beyond round-off: go on from here, but not with j again
        else:  # an increase (round-off in the minor cycle): back to the best corral
            tried.add(j)
            corral, lam = list(best[1]), best[2].copy()
            alpha = _embed(k, corral, lam)
            gap, slack, xx = prob.gaps(alpha, tol)
        violated = gap < -slack
        violated[corral] = False
        if not violated.any():
            converged = True  # optimal to round-off: keep this point (its |x|^2 may read
            break  # higher than an earlier one's: both are round-off at that level)
        violated[list(tried)] = False
        if not violated.any():
            break
        j = _entering_task(q, alpha, xx, violated, gap, slack)
        corral.append(j)
        lam = np.append(lam, 0.0)
        corral, lam = _minor_cycle(prob, corral, lam, exact)
    if (
        not converged
        and best is not None
        and best[0] < float(lam @ q[np.ix_(corral, corral)] @ lam)
    ):
        corral, lam = best[1], best[2]
    return _embed(k, corral, lam), converged


def _initial_corral(
    prob: _Problem, warm: bool, support: np.ndarray | None, exact: bool
) -> tuple[list[int], np.ndarray]:
    """Where Wolfe's method starts: the warm-start corral (:func:`_warm_start`) when ``warm``
    and one is found, else the vertex of the shortest gradient with weight one."""
    start = _warm_start(prob, support, exact=exact) if warm else None
    if start is None:
        return [int(np.argmin(prob.q.diagonal()))], np.array([1.0])
    return start


def _embed(k: int, corral: list[int], lam: np.ndarray) -> np.ndarray:
    """The weights ``lam`` of the corral's tasks as a point ``alpha`` of the K-simplex."""
    alpha = np.zeros(k)
    alpha[corral] = lam
    return alpha


def _entering_task(
    q: np.ndarray,
    alpha: np.ndarray,
    xx: float,
    violated: np.ndarray,
    gap: np.ndarray,
    slack: np.ndarray,
) -> int:
    """The violating task that enters the corral: the largest exact line-search decrease
    ``(x.x - x.p_j)^2 / |x - p_j|^2`` from ``x = alpha`` (``xx = |x|^2``) towards ``p_j``; if
    every violator is at distance 0 (round-off), the one of most negative ``gap + slack``
    (see :meth:`_Problem.gaps`)."""
    x_dot = q @ alpha
    dist2 = xx - 2.0 * x_dot + q.diagonal()  # |x - p_j|^2
    safe = np.where(dist2 > 0, dist2, 1.0)
    gain = np.where(violated & (dist2 > 0), (xx - x_dot) ** 2 / safe, -1.0)
    j = int(np.argmax(gain))
    if not violated[j]:  # every violator at distance 0 (round-off): take the worst gap
        j = int(np.argmin(np.where(violated, gap + slack, np.inf)))
    return j


def _minor_cycle(
    prob: _Problem, corral: list[int], lam: np.ndarray, exact: bool
) -> tuple[list[int], np.ndarray]:
    """Wolfe's minor cycle from the weights ``lam`` on ``corral`` (at most ``K + 1`` moves):
    stop at the corral's affine minimiser when it is in the corral's relative interior;
    otherwise step towards it until a weight reaches zero, drop that task and repeat. Stops
    unchanged when the affine solve fails (a numerically empty problem)."""
    for _minor in range(prob.k + 1):
        b, beta = prob.affine(corral, exact)
        if not np.isfinite(b).all():
            break
        positive = _support(beta)
        if positive.all():
            lam = b
            break
        corral, lam = _step_to_face(prob, corral, lam, b, positive)
    return corral, lam


def _step_to_face(
    prob: _Problem, corral: list[int], lam: np.ndarray, b: np.ndarray, positive: np.ndarray
) -> tuple[list[int], np.ndarray]:
    """Move from ``lam`` towards the affine minimiser ``b`` (``positive``: its entries above
    round-off) until the first coordinate hits zero, and drop the tasks that reached zero
    (the one that hit it first, and those below round-off of the largest contribution)."""
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
    return corral, lam


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
