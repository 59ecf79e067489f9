"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232,
2024; TorchJD): project every task gradient onto the dual cone of all of them and average.

The weighting is a pure function of the Gram matrix :func:`upgrad_weights`; the class
:class:`UPGrad` applies it at either level (representation or shared parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, device_of, host_array, to_torch
from ._options import check_positive

__all__ = ["UPGrad", "upgrad_weights"]

#: float64 machine epsilon
_EPS = float(np.finfo(np.float64).eps)
#: multiples of ``n eps (1 + sum x)`` under which a gradient entry counts as zero in the QP
_QP_ROUNDING = 16.0


# ---------------------------------------------------------------------- shared helpers
def _pref_vector_np(
    pref_vector: Any, k: int | None, name: str = "pref_vector"
) -> np.ndarray | None:
    """A validated float64 copy of a preference (task priority) vector, or ``None``.

    Raises:
        ValueError: not a non-empty 1-D vector, not finite, negative, all zero, or of the wrong
            length (when ``k`` is known).
    """
    if pref_vector is None:
        return None
    try:
        p = np.array(host_array(pref_vector), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {pref_vector!r}") from None
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not (p > 0).any():
        raise ValueError(f"{name} must be finite, non-negative and not all zero, got {p.tolist()}")
    if k is not None and p.size != k:
        raise ValueError(f"{name} has {p.size} entries but there are {k} tasks")
    return p


def _unit_scale(m: np.ndarray) -> np.ndarray:
    """``m`` times an exact power of two that puts ``max_k M_kk`` in ``[1, 4)`` (0 stays 0)."""
    top = float(np.max(np.diagonal(m), initial=0.0))
    if not top > 0.0:
        return m.copy()
    scaled: np.ndarray = np.ldexp(m, -int(np.frexp(top)[1]))
    return scaled


def _cosines(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(C, norms, active)``: the cosine matrix ``C = D^-1/2 M D^-1/2`` of the non-zero
    gradients (``active``: ``M_kk`` above the smallest normal float64 after an exact power-of-two
    scaling; the norms are those of the scaled matrix) with its diagonal set to exactly 1."""
    q = _unit_scale(m)
    diag = np.diagonal(q)
    active = diag > np.finfo(np.float64).tiny
    norms = np.sqrt(np.where(active, diag, 0.0))
    n_a = norms[active]
    c = q[np.ix_(active, active)] / np.outer(n_a, n_a)
    c = np.clip(0.5 * (c + c.T), -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c, norms, active


def _lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares solution of ``a x = b`` (``a`` small, symmetric PSD)."""
    x: np.ndarray = np.linalg.lstsq(a, b, rcond=None)[0]
    return x


def _nnqp_np(c: np.ndarray, q: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """``argmin_{x >= 0} 1/2 x^T C x + q^T x`` for a small PSD ``C`` with unit diagonal.

    Lawson & Hanson's active-set NNLS algorithm (1974, ch. 23) written on the normal equations
    (the "fast NNLS" form of Bro & De Jong, 1997): ``C`` plays ``A^T A`` and ``q`` plays
    ``-A^T b``. Every sub-problem on the passive set is solved by minimum-norm least squares, so
    a PSD-singular ``C`` (duplicate or dependent gradients) is fine as long as the problem is
    bounded below (``q`` in the range of ``C``, as for ``q = C u``). It terminates in finitely
    many steps with the exact optimum up to round-off: the gradient ``C x + q`` is ``>= -tol`` on
    the zero entries and ``~0`` on the positive ones, ``tol = 16 n eps (1 + sum x)``. An index
    whose sub-solve rejects it the moment it enters (round-off) is set aside until ``x`` moves.
    """
    n = q.shape[0]
    if max_iter is None:
        max_iter = 10 * n + 20
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        grad = c @ x + q
        tol = _QP_ROUNDING * n * _EPS * (1.0 + float(x.sum()))
        cand = ~passive & ~blocked & (grad < -tol)
        if not cand.any():
            break
        j = int(np.argmin(np.where(cand, grad, np.inf)))
        passive[j] = True
        first = True
        while True:
            idx = np.flatnonzero(passive)
            s = np.zeros(n)
            s[idx] = _lstsq(c[np.ix_(idx, idx)], -q[idx])
            if (s[idx] > 0.0).all():
                x = s
                blocked[:] = False
                break
            if first and s[j] <= 0.0:  # round-off: j is rejected the moment it enters
                passive[j] = False
                blocked[j] = True
                break
            first = False
            neg = idx[s[idx] <= 0.0]
            ratios = x[neg] / (x[neg] - s[neg])  # x > 0 >= s on neg: well defined, in [0, 1)
            hit = int(np.argmin(ratios))
            x = x + float(ratios[hit]) * (s - x)
            x[neg[hit]] = 0.0
            passive &= x > 0.0
            x[~passive] = 0.0
    out: np.ndarray = np.clip(x, 0.0, None)
    return out


def _dual_cone_weights_np(m: np.ndarray, u: np.ndarray, reg_eps: float = 0.0) -> np.ndarray:
    """Weights ``v`` of the projection of ``G^T u`` (``u >= 0``) onto the dual cone of the rows:
    ``v = argmin 1/2 v^T M v  s.t.  v >= u`` (Proposition 1 of the UPGrad paper).

    Solved on the cosine matrix: with ``v = y / |g|`` the problem is
    ``min y^T C y  s.t.  y >= u |g|`` (:func:`_nnqp_np` on ``x = y - u |g|``), whose conditioning
    depends on the angles between the gradients, not on their norms. A zero gradient keeps
    ``v_k = u_k`` (its weight changes nothing). ``reg_eps > 0`` solves with TorchJD's
    regularised matrix ``M / tr(M) + reg_eps I`` instead (the non-conflict guarantee then holds
    only up to ``reg_eps``).
    """
    k = m.shape[0]
    if reg_eps > 0.0:
        tr = float(np.trace(m))
        m = (m / tr if tr > 0.0 else np.zeros_like(m)) + reg_eps * np.eye(k)
    v = np.array(u, dtype=np.float64)
    c, norms, active = _cosines(m)
    if not active.any():
        return v
    n_a = norms[active]
    y0 = v[active] * n_a
    top = float(np.max(y0, initial=0.0))
    if not top > 0.0:  # u = 0 on the non-zero gradients: the projection of 0 is 0
        return v
    # the problem is homogeneous in u: solve it for max(y0) = 1 (the QP's tolerances are
    # relative to that scale), then scale back
    x = _nnqp_np(c, c @ (y0 / top)) * top
    v[active] = (y0 + x) / n_a
    return v


# ---------------------------------------------------------------------- the method
def _upgrad_weights_np(
    gram: np.ndarray, pref_vector: np.ndarray | None = None, reg_eps: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`upgrad_weights` on a host Gram matrix; returns ``(c, V)`` with ``V[i] = v^(i)``."""
    m = check_gram(gram)
    k = m.shape[0]
    p = np.full(k, 1.0 / k) if pref_vector is None else pref_vector
    if p.size != k:
        raise ValueError(f"pref_vector has {p.size} entries but the Gram matrix is {k} x {k}")
    proj = np.zeros((k, k))
    for i in range(k):
        proj[i] = _dual_cone_weights_np(m, np.eye(k)[i], reg_eps)
    c: np.ndarray = p @ proj
    return c, proj


def upgrad_weights(
    gram: Tensor | np.ndarray,
    *,
    pref_vector: Sequence[float] | Tensor | np.ndarray | None = None,
    reg_eps: float = 0.0,
) -> Tensor:
    """UPGrad coefficients from a Gram matrix: a pure function, usable without a model.

    ``v^(i) = argmin_v 1/2 v^T M v  s.t.  v >= e_i`` (the weights of the projection of ``g_i``
    onto the dual cone ``{x : g_j . x >= 0 for all j}``) and ``c = sum_i p_i v^(i)`` with
    ``p = 1/K`` (or ``pref_vector``). See :class:`UPGrad`.

    Returns:
        ``(K,)`` float64 coefficients on ``gram``'s device (CPU for NumPy input).
    """
    g = host_array(gram)
    p = _pref_vector_np(pref_vector, None)
    reg = check_positive("reg_eps", reg_eps, allow_zero=True)
    c, _ = _upgrad_weights_np(g, p, reg)
    return to_torch(c, device_of(gram))


class UPGrad(BalancedOptimizer):
    """Unconflicting projection of gradients: average of the task gradients projected onto the
    dual cone of all task gradients.

    Formula (Quinton & Rey 2024, Eq. 5 and Proposition 1; TorchJD's ``UPGrad``)::

        v^(i) = argmin_v  1/2 v^T M v   s.t.  v >= e_i        (i = 1..K)
        c     = sum_i p_i v^(i),   p = (1/K, ..., 1/K) or pref_vector
        d     = sum_k c_k g_k

    ``G^T v^(i)`` is the Euclidean projection of ``g_i`` onto the dual cone
    ``{x : g_j . x >= 0 for all j}``, so ``d`` is a non-negative combination of points of that
    cone: ``g_j . d = (M c)_j >= 0`` for every task (non-conflicting by construction).

    Solver (exact, no QP package): each projection is a non-negative least-squares problem in
    Gram form, solved by Lawson & Hanson's active-set algorithm on the cosine matrix
    ``C = D^-1/2 M D^-1/2`` (``D = diag M``), see :func:`balancers.upgrad._nnqp_np`. It terminates
    with the exact optimum up to round-off; working with cosines makes it indifferent to gradient
    norms spanning many orders of magnitude, and minimum-norm least-squares sub-solves make it
    tolerant to a PSD-singular ``M`` (duplicate, dependent or zero gradients: a zero gradient
    ``g_k`` keeps ``v^(i)_k = [i = k]``, which changes nothing). TorchJD solves the same QP with
    ``quadprog`` after normalising ``M`` by its trace and adding ``1e-4 I``; ``reg_eps=1e-4``
    reproduces that.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        pref_vector: non-negative task priorities ``p`` (default ``1/K`` each).
        reg_eps: ``0`` (default): the exact projection. ``> 0``: solve with
            ``M / tr(M) + reg_eps I`` like TorchJD (whose default is ``1e-4``); ``g_j . d`` may
            then be slightly negative.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    State: none. Cost per step on the host: K non-negative QPs of size K (each a few K x K
    least-squares solves), i.e. ``O(K^4)`` flops at worst; negligible next to the K backward
    passes for the K <= ~64 it is meant for.

    ``BalanceInfo.extras``: ``projections``, the ``(K, K)`` matrix whose row ``i`` is ``v^(i)``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        pref_vector: Sequence[float] | Tensor | np.ndarray | None = None,
        reg_eps: float = 0.0,
        **kwargs: Any,
    ) -> None:
        p = _pref_vector_np(pref_vector, num_tasks)
        if p is not None and num_tasks is None:
            num_tasks = p.size
        self.reg_eps = check_positive("reg_eps", reg_eps, allow_zero=True)
        super().__init__(optimizer, num_tasks, **kwargs)
        self.pref_vector = p

    def _repr_options(self) -> str:
        p = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={p}, reg_eps={self.reg_eps}, {super()._repr_options()}"

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`_upgrad_weights_np` on the step's host Gram matrix; ``(c, {"projections"})``."""
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        c, proj = _upgrad_weights_np(gram, self.pref_vector, self.reg_eps)
        return c, {"projections": proj}
