"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
2021): the direction within a ball around the average gradient that maximises the worst task's
improvement.

The weighting is a pure function of the Gram matrix :func:`cagrad_weights`; the class
:class:`CAGrad` applies it at either level (representation or shared parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, device_of, host_array, to_torch
from ._min_norm import _min_norm_weights_np
from ._options import check_bool, check_positive
from .upgrad import _dual_cone_weights_np, _unit_scale

__all__ = ["CAGrad", "cagrad_weights"]

_EPS = float(np.finfo(np.float64).eps)
#: doublings of lambda tried when the hull of the gradients contains 0 (see _cagrad_np)
_MAX_DOUBLINGS = 200
#: cap on the root finder's steps (it needs about 10-30)
_MAX_ROOT_STEPS = 200


def _bracketed_root(f: Callable[[float], float], a: float, b: float, fa: float, fb: float) -> float:
    """A root of the continuous non-decreasing ``f`` in ``[a, b]`` with ``fa < 0 < fb``.

    The Illinois variant of regula falsi (Dowell & Jarratt 1971): keeps the bracket, converges
    superlinearly, and stops when the bracket is a few ulps wide or ``f`` vanishes.
    """
    side = 0
    for _ in range(_MAX_ROOT_STEPS):
        x = (a * fb - b * fa) / (fb - fa)
        if not a < x < b:  # round-off at a tiny bracket: bisect
            x = 0.5 * (a + b)
        if b - a <= 4.0 * _EPS * max(abs(a), abs(b), 1.0):
            return x
        fx = f(x)
        if fx == 0.0:
            return x
        if fx < 0.0:
            a, fa = x, fx
            if side == -1:
                fb *= 0.5
            side = -1
        else:
            b, fb = x, fx
            if side == 1:
                fa *= 0.5
            side = 1
    return 0.5 * (a + b)


def _root_in(f: Callable[[float], float], a: float, b: float) -> float:
    """A root of the continuous non-decreasing ``f`` in ``[a, b]``: an end of the bracket where
    ``f`` already has the right sign there (round-off at the bracket's end), otherwise
    :func:`_bracketed_root`."""
    fa, fb = f(a), f(b)
    if fb <= 0.0:  # round-off at the bracket's end: f(b) = 0
        return b
    if fa >= 0.0:
        return a
    return _bracketed_root(f, a, b, fa, fb)


def _gram_norm(q: np.ndarray, w: np.ndarray) -> float:
    """``|sum_k w_k g_k|`` from the Gram matrix ``q`` (a negative round-off square gives 0)."""
    return math.sqrt(max(float(w @ q @ w), 0.0))


def _dual_cone_projection(q: np.ndarray, one: np.ndarray) -> tuple[np.ndarray, float]:
    """``(v, |G^T v - g_0|)``: the coefficients ``v`` of the projection of ``g_0 = G^T one``
    onto the dual cone ``{x : g_k . x >= 0 for all k}`` and its distance from ``g_0``."""
    v = _dual_cone_weights_np(q, one)
    return v, _gram_norm(q, v - one)


def _cagrad_np(
    gram: np.ndarray, c: float = 0.5, rescale: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`cagrad_weights` on a host Gram matrix; returns ``(coefficients, w, lam)`` with
    ``w`` the simplex weights of ``g_w`` and ``lam = c |g_0| / |g_w|`` (``inf`` in the
    degenerate case, 0 when ``c |g_0| = 0``)."""
    m = check_gram(gram)
    k = m.shape[0]
    one = np.full(k, 1.0 / k)
    q = _unit_scale(m)  # an exact power of two: the coefficients do not depend on it
    b = q @ one  # G g_0
    phi = c * math.sqrt(max(float(one @ b), 0.0))  # c |g_0|
    scale = 1.0 / (1.0 + c * c) if rescale else 1.0
    if not phi > 0.0:  # c = 0 or g_0 = 0: d = g_0
        return one * scale, one.copy(), 0.0
    norms = np.sqrt(np.clip(np.diagonal(q), 0.0, None))
    g0sq = float(one @ b)
    cache: dict[float, tuple[float, np.ndarray]] = {}

    def solve(lam: float) -> tuple[float, np.ndarray]:
        """``(|g_w|, w)`` with ``w = argmin_{simplex} |g_0 + lam g_w|^2``."""
        if lam not in cache:
            if lam <= 1.0:
                shifted = g0sq + lam * (b[:, None] + b[None, :]) + lam * lam * q
            else:  # the same hull scaled by 1/lam (same weights), without overflow
                shifted = g0sq / (lam * lam) + (b[:, None] + b[None, :]) / lam + q
            w = _min_norm_weights_np(check_gram(shifted), ridge=0.0)
            cache[lam] = (_gram_norm(q, w), w)
        return cache[lam]

    def psi(log_lam: float) -> float:
        lam = math.exp(log_lam)
        return lam * solve(lam)[0] - phi

    def toward_cone() -> tuple[np.ndarray, np.ndarray, float]:
        """``g_w`` is 0 to working precision: move from ``g_0`` toward its projection onto the
        dual cone, by at most ``c |g_0|`` (the whole way is optimal when it fits the ball)."""
        v, dist = _dual_cone_projection(q, one)
        t = 1.0 if dist <= phi else phi / dist
        gap = v - one
        return (one + t * gap) * scale, w_min, math.inf

    def negligible(r: float, w: np.ndarray) -> bool:
        """``|g_w| = r`` below the round-off of ``w^T M w`` computed from the Gram matrix."""
        return bool(r * r <= 8.0 * k * _EPS * float(w @ norms) ** 2)

    w_min = _min_norm_weights_np(q, ridge=0.0)
    r_min = _gram_norm(q, w_min)
    lo = phi / (2.0 * float(norms.max()))  # lam |g_w(lam)| <= lam max|g_k| < phi
    if not negligible(r_min, w_min):
        hi = phi / r_min  # |g_w(lam)| >= r_min, so psi(hi) >= 0
    else:
        # 0 is in the convex hull: the best worst-case improvement is at most 0. If the
        # projection of g_0 onto the dual cone lies in the ball, it attains 0 and is the optimum
        # closest to g_0; otherwise lam |g_w(lam)| still exceeds c |g_0| for a finite lam.
        v, dist = _dual_cone_projection(q, one)
        if dist <= phi:
            return v * scale, w_min, math.inf
        hi = max(lo, 1.0)
        for _ in range(_MAX_DOUBLINGS):
            if psi(math.log(hi)) >= 0.0:
                break
            hi *= 2.0
        else:  # not reached in exact arithmetic
            return toward_cone()
    r, w = solve(math.exp(_root_in(psi, math.log(lo), math.log(hi))))
    if negligible(r, w):  # g_w cancels to round-off (nearly opposite gradients)
        return toward_cone()
    lam = phi / r
    coef: np.ndarray = (one + lam * w) * scale
    return coef, w, lam


def cagrad_weights(gram: Tensor | np.ndarray, *, c: float = 0.5, rescale: bool = False) -> Tensor:
    """CAGrad coefficients from a Gram matrix: a pure function, usable without a model.

    ``w = argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|``,
    ``d = g_0 + (c |g_0| / |g_w|) g_w`` (times ``1/(1+c^2)`` with ``rescale``), returned as the
    coefficients of ``d = sum_k c_k g_k``. See :class:`CAGrad`.

    Returns:
        ``(K,)`` float64 coefficients on ``gram``'s device (CPU for NumPy input).
    """
    cc = check_positive("c", c, allow_zero=True)
    rs = check_bool("rescale", rescale)
    coef, _, _ = _cagrad_np(host_array(gram), cc, rs)
    return to_torch(coef, device_of(gram))


class CAGrad(BalancedOptimizer):
    """Conflict-averse gradient descent: maximise the worst task's improvement near ``g_0``.

    Formula (Liu et al. 2021, Eq. 4 and Algorithm 1; TorchJD's ``CAGrad``)::

        max_d min_k g_k . d   s.t.  |d - g_0| <= c |g_0|,      g_0 = (1/K) sum_k g_k
        dual:  w = argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|,   g_w = sum_k w_k g_k
        d = g_0 + (c |g_0| / |g_w|) g_w                     (optionally / (1 + c^2))

    returned as coefficients ``c_k = 1/K + (c |g_0| / |g_w|) w_k`` of ``d = sum_k c_k g_k``.

    Solver (exact up to round-off; no convex-optimisation package). For fixed ``lam > 0`` the
    KKT conditions of the dual are those of ``min_{simplex} g_w . g_0 + lam/2 |g_w|^2``, i.e.
    the min-norm point of the shifted hull ``{g_0 + lam g_k}``, solved exactly by Wolfe's
    algorithm (:func:`balancers.min_norm_weights`) on its Gram matrix
    ``|g_0|^2 + lam (G g_0 1^T + 1 g_0^T G^T) + lam^2 M``; the dual's solution is that of the
    ``lam`` with ``lam |g_w(lam)| = c |g_0|``. ``lam |g_w(lam)|`` is non-decreasing in ``lam``
    (the substitution ``t = 1/lam`` makes ``min_w`` of the jointly convex
    ``g_w . g_0 + |g_w|^2 / (2t) + (c|g_0|)^2 t / 2`` a convex function of ``t`` whose derivative
    is ``((c|g_0|)^2 - |g_w|^2/t^2) / 2``), so the root is bracketed by
    ``[c|g_0| / (2 max_k |g_k|), c|g_0| / min_{simplex} |g_w|]`` and found on
    ``log lam`` to machine precision with the Illinois method (about 10-30 Wolfe solves). The original code minimises the
    dual with SciPy's SLSQP and TorchJD with cvxpy/Clarabel, both to their default tolerances.

    Degenerate cases (choices; the paper assumes ``g_w != 0``):

    * ``c = 0`` or ``g_0 = 0``: ``d = g_0`` (``c_k = 1/K``).
    * ``0`` in the convex hull of the gradients (a Pareto-stationary point: ``min |g_w| = 0``)
      and ``c |g_0|`` at least the distance from ``g_0`` to the dual cone
      ``{x : g_k . x >= 0 for all k}``: every ``d`` of the ball inside the cone is optimal (worst
      improvement 0) and ``|g_w| = 0`` leaves the formula undefined; we return the projection of
      ``g_0`` onto the dual cone (the optimum closest to ``g_0``; UPGrad's QP with
      ``v >= 1/K``). TorchJD returns all-zero weights when ``|g_w|`` is below ``1e-4`` (after
      normalising ``M`` by its trace); the original code divides by ``|g_w| + 1e-8``.
    * ``|g_w|`` at the solution below the round-off of ``w^T M w`` (a nearly opposite pair
      cancels in ``g_w``), or the projection above farther than ``c |g_0|`` with no root found:
      ``d`` moves from ``g_0`` toward that projection by at most ``c |g_0|``:
      ``c_k = 1/K + min(1, c |g_0| / L) (v_k - 1/K)``, ``L = |G^T v - g_0|``; ``lam = inf``.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        c: radius of the ball relative to ``|g_0|`` (``>= 0``, default 0.5; 0 gives the mean
            gradient).
        rescale: divide ``d`` by ``1 + c^2`` (default ``False``, as TorchJD, which has no such
            option; the original code's ``rescale=1`` default does it).
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    State: none. Cost per step on the host: about 10-30 exact min-norm solves on K x K matrices.

    ``BalanceInfo.extras``: ``w`` (the simplex weights of ``g_w``) and ``lam``
    (``c |g_0| / |g_w|``; ``inf`` in the degenerate case).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        c: float = 0.5,
        rescale: bool = False,
        **kwargs: Any,
    ) -> None:
        self.c = check_positive("c", c, allow_zero=True)
        self.rescale = check_bool("rescale", rescale)
        super().__init__(optimizer, num_tasks, **kwargs)

    def _repr_options(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, {super()._repr_options()}"

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`_cagrad_np` on the step's host Gram matrix."""
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        coef, w, lam = _cagrad_np(gram, self.c, self.rescale)
        return coef, {"w": w, "lam": np.float64(lam)}
