"""Exact min-norm point of the convex hull of task gradients, from their Gram matrix.

Solves MGDA's subproblem (Sener & Koltun 2018, Eq. 3)::

    alpha* = argmin_{alpha in simplex} alpha^T M alpha ,   M = G G^T

with Wolfe's min-norm-point algorithm (Wolfe 1976) written on the Gram matrix, and the closed
form (Eq. 4) for two tasks. Wolfe's method is an active-set method: it terminates in finitely many
steps with the exact optimum (up to float64 round-off), unlike Frank-Wolfe, whose usual
tolerances leave KKT gaps of order one on inputs whose optimum lies on a face of the simplex.

Uniqueness: when gradients are linearly dependent (duplicates, K > dimension) the optimal
``alpha`` is not unique although ``d = G^T alpha`` is. The solver minimises
``alpha^T (M/s + ridge*I) alpha`` with ``s = max_k M_kk`` and a tiny ``ridge`` (default 1e-12),
which approximates the optimal alpha of least Euclidean norm: a unique, permutation-equivariant
choice. Tasks with identical gradients (duplicates, several zero gradients) are merged before the
solve and share their weight equally, so those ties are broken exactly. The KKT conditions of the
original problem hold to about ``ridge * s``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._host import host_array

__all__ = ["min_norm_weights", "project_simplex"]


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
    return np.clip(y - tau, 0, None)


def _check_gram(gram: Tensor | np.ndarray) -> np.ndarray:
    """A validated, symmetrised float64 host copy of a ``(K, K)`` Gram matrix."""
    return _check_gram_np(host_array(gram))


def _check_gram_np(m: np.ndarray) -> np.ndarray:
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("gram contains NaN or infinite entries")
    return 0.5 * (m + m.T)


def _two_task(q: np.ndarray) -> np.ndarray:
    """Closed form for K = 2 (Sener & Koltun, Eq. 4): weight on task 1 clipped to [0, 1]."""
    denom = q[0, 0] + q[1, 1] - 2.0 * q[0, 1]
    a = 0.5 if denom <= 0 else float(np.clip((q[1, 1] - q[0, 1]) / denom, 0.0, 1.0))
    return np.array([a, 1.0 - a])


def _affine_minimizer(q_s: np.ndarray) -> np.ndarray:
    """argmin_{sum b = 1} b^T Q_S b, from the bordered KKT system."""
    n = q_s.shape[0]
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = q_s
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    try:
        sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return sol[:n]


def _warm_start(q: np.ndarray, rounds: int = 4) -> tuple[list[int], np.ndarray] | None:
    """A starting corral for Wolfe's method: drop the points whose affine weight is not positive.

    Start from every point; the minimiser ``b`` of ``b^T Q_S b`` on ``sum b = 1`` (one bordered
    solve) is kept when ``b > 0``; otherwise the points with ``b_i <= 0`` leave ``S`` and the
    solve is repeated (at most ``rounds`` times). A positive ``b`` is exactly the state Wolfe's
    method reaches after a minor cycle (the affine minimiser of its corral, in the corral's
    relative interior), so the major iterations continue from it with the same guarantees; when
    the optimum has full support (or loses only a few points) they stop at the first test.
    """
    support = np.arange(q.shape[0])
    for _ in range(rounds):
        b = _affine_minimizer(q[np.ix_(support, support)])
        if not np.isfinite(b).all():
            return None
        positive = b > 1e-15
        if positive.all():
            return support.tolist(), b / b.sum()
        if not positive.any():
            return None
        support = support[positive]
    return None


def _wolfe(q: np.ndarray, max_iter: int, tol: float, warm: bool = True) -> np.ndarray:
    k = q.shape[0]
    start = _warm_start(q) if warm else None
    if start is None:
        corral, lam = [int(np.argmin(np.diag(q)))], np.array([1.0])
    else:
        corral, lam = start
    for _ in range(max_iter):
        x_dot = q[:, corral] @ lam  # <p_j, x> for every point j
        xx = float(lam @ x_dot[corral])
        j = int(np.argmin(x_dot))
        if x_dot[j] >= xx - tol or j in corral:
            break
        corral.append(j)
        lam = np.append(lam, 0.0)
        for _minor in range(k + 1):
            beta = _affine_minimizer(q[np.ix_(corral, corral)])
            if (beta > 1e-15).all():
                lam = beta
                break
            # move from lam towards beta until the first coordinate hits zero
            neg = beta <= 1e-15
            ratios = np.full(beta.shape, np.inf)
            ok = neg & (lam > beta)
            ratios[ok] = lam[ok] / (lam[ok] - beta[ok])
            theta = float(min(1.0, ratios.min()))
            lam = lam + theta * (beta - lam)
            keep = lam > 1e-15
            if np.isfinite(ratios.min()):
                keep[int(np.argmin(ratios))] = False
            if not keep.any():  # pragma: no cover - numerical safety
                keep[int(np.argmax(lam))] = True
            corral = [c for c, kp in zip(corral, keep) if kp]
            lam = lam[keep]
            lam = lam / lam.sum()
    alpha = np.zeros(k)
    alpha[corral] = lam
    return alpha


def _duplicate_groups(q: np.ndarray, rtol: float = 1e-12) -> list[list[int]]:
    """Tasks whose gradients coincide (``|g_i - g_j|^2 <= rtol (|g_i|^2 + |g_j|^2)``)."""
    k = q.shape[0]
    d = np.diag(q)
    dist2 = d[:, None] + d[None, :] - 2.0 * q
    same = dist2 <= rtol * (d[:, None] + d[None, :])
    groups: list[list[int]] = []
    assigned = np.zeros(k, dtype=bool)
    for i in range(k):
        if assigned[i]:
            continue
        members = [j for j in range(i, k) if not assigned[j] and same[i, j]]
        assigned[members] = True
        groups.append(members)
    return groups


def min_norm_weights(
    gram: Tensor | np.ndarray,
    *,
    max_iter: int | None = None,
    tol: float = 1e-14,
    ridge: float = 1e-12,
) -> Tensor:
    """Weights ``alpha`` on the simplex minimising ``|| sum_k alpha_k g_k ||^2``.

    Args:
        gram: ``(K, K)`` Gram matrix ``M_ij = <g_i, g_j>`` (symmetric positive semi-definite).
        max_iter: cap on Wolfe's major iterations (default ``50 * K + 100``; the method
            terminates long before on every input we have seen).
        tol: stopping tolerance of the optimality test ``<p_j, x> >= <x, x> - tol`` on the
            scaled problem (``max_k M_kk = 1``).
        ridge: Tikhonov term on the scaled problem that makes the solution unique (see the
            module docstring); ``0`` disables it.

    Returns:
        ``(K,)`` float64 tensor on the simplex. All-zero gradients give uniform weights.

    The KKT conditions of the min-norm problem are ``(M alpha)_i >= alpha^T M alpha`` for all
    ``i``, with equality where ``alpha_i > 0``.
    """
    return torch.from_numpy(
        _min_norm_weights_np(_check_gram(gram), max_iter=max_iter, tol=tol, ridge=ridge)
    )


def _min_norm_weights_np(
    m: np.ndarray, *, max_iter: int | None = None, tol: float = 1e-14, ridge: float = 1e-12
) -> np.ndarray:
    """:func:`min_norm_weights` on a validated, symmetric float64 host Gram matrix."""
    k = m.shape[0]
    if max_iter is None:
        max_iter = 50 * k + 100
    scale = float(np.max(np.diag(m)))
    if k == 1:
        alpha = np.ones(1)
    elif scale <= 0.0:
        alpha = np.full(k, 1.0 / k)
    else:
        q = m / scale
        groups = _duplicate_groups(q)
        reps = [g[0] for g in groups]
        qr = q[np.ix_(reps, reps)] + ridge * np.eye(len(reps))
        if len(reps) == 1:
            ar = np.ones(1)
        elif len(reps) == 2:
            ar = _two_task(qr)
        else:
            ar = _wolfe(qr, max_iter, tol)
        alpha = np.zeros(k)
        for g, a in zip(groups, ar):
            alpha[g] = a / len(g)  # duplicates share their weight equally
    alpha = np.clip(alpha, 0.0, None)
    return alpha / alpha.sum()
