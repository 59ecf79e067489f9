"""GradOPS (Zhu et al., WSDM 2025): orthogonal projections onto subspaces, from the Gram matrix.

Each task gradient ``g_i`` is projected onto the orthogonal complement of
``S_i = span{g_j : j != i}``::

    g_i' = g_i - P_{S_i} g_i

so ``g_j . g_i' = 0`` for ``j != i`` and ``g_i . g_i' = |g_i'|^2 >= 0``; hence for any
non-negative weights ``w`` the update ``G' = sum_i w_i g_i'`` satisfies
``g_j . G' = w_j |g_j'|^2 >= 0`` for every task ``j`` (no conflict with any original gradient).

Every ``g_i'`` is a linear combination of the ORIGINAL gradients, ``g_i' = sum_k P[i, k] g_k``,
and ``P`` depends on the gradients only through their Gram matrix ``M = G G^T``:

* closed form (``M`` invertible): ``P[i, k] = [M^-1]_{ik} / [M^-1]_{ii}``;
* least squares (linearly dependent gradients): ``g_i' = g_i - sum_{j != i} a_j g_j`` with ``a``
  the minimum-norm solution of the normal equations ``M_{JJ} a = M_{Ji}`` (``J`` = the other
  tasks), i.e. ``a = pinv(M_{JJ}) M_{Ji}``; ``g_i' = 0`` when ``g_i`` lies in ``S_i``.

So the method runs at the representation level and at the parameter level through
:class:`mtl.BalancedOptimizer` without materialising any projected gradient: the shared part
receives ``sum_k c_k g_k`` with ``c = P^T w``.

Fidelity (``/work/shared/reference/methods.md`` section 4): the projection and the non-conflict
guarantee are the paper's [A]; the trade-off weights ``w(alpha)``, the fallback for dependent
gradients and ``only_if_conflict`` are documented reconstructions [R], not the paper's formulas.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import device_of, host_array, to_torch
from ._min_norm import _min_norm_weights_np

__all__ = [
    "GradOPS",
    "gradops_coefficients",
    "gradops_projections",
    "gradops_tradeoff_weights",
]

Fallback = Literal["sum", "mgda", "zero"]
WeightSum = Literal["K", "1"]
Solver = Literal["auto", "closed_form", "lstsq"]
_FALLBACKS = ("sum", "mgda", "zero")
_WEIGHT_SUMS = ("K", "1")
_SOLVERS = ("auto", "closed_form", "lstsq")

#: default relative threshold on the eigenvalues of the normalised Gram matrix (numerical rank)
DEFAULT_RCOND = 1e-10
#: default relative threshold on squared gradient norms below which a task counts as zero
DEFAULT_EPS = 1e-30


# ---------------------------------------------------------------------- validation helpers
def _as_gram(gram: Tensor | np.ndarray) -> tuple[np.ndarray, torch.device]:
    """A validated, symmetrised float64 host copy of ``gram`` and the device results go to."""
    return _check_gram_np(host_array(gram)), device_of(gram)


def _check_gram_np(m: np.ndarray) -> np.ndarray:
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square (K, K) matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("gram contains NaN or infinite entries")
    return 0.5 * (m + m.T)


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} "
            f"number, got {value!r}"
        )
    return v


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a real number, got {alpha!r}")
    a = float(alpha)
    if not math.isfinite(a):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return a


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _weight_total(weight_sum: str, k: int) -> float:
    return float(k) if weight_sum == "K" else 1.0


# ---------------------------------------------------------------------- projections
def gradops_projections(
    gram: Tensor | np.ndarray,
    *,
    only_if_conflict: bool = False,
    solver: Solver = "auto",
    rcond: float = DEFAULT_RCOND,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, dict[str, Any]]:
    """GradOPS projections as a ``(K, K)`` coefficient matrix: ``g_i' = sum_k P[i, k] g_k``.

    ``g_i'`` is ``g_i`` minus its orthogonal projection onto ``span{g_j : j != i}``.

    The computation works on the normalised Gram matrix ``C = D^-1/2 M D^-1/2``
    (``D = diag(M)``, zero-gradient tasks removed), which makes it invariant to the scale of each
    gradient, and maps back with ``P[i, k] = P_C[i, k] |g_i| / |g_k|``.

    * ``solver="closed_form"``: ``P_C[i, k] = [C^-1]_{ik} / [C^-1]_{ii}`` (raises
      ``ValueError`` when ``C`` is singular to working precision,
      ``lambda_min(C) <= rcond * lambda_max(C)``).
    * ``solver="lstsq"``: for each task, ``a = pinv(C_JJ, rtol=rcond) C_Ji`` over the other tasks
      ``J`` and ``P_C[i] = e_i - sum_{j in J} a_j e_j``: correct for linearly dependent gradients.
    * ``solver="auto"`` (default): the closed form when ``lambda_min(C) > rcond * lambda_max(C)``
      (then every sub-block is well conditioned too and both agree to round-off), least squares
      otherwise.

    A projection is declared *vanished* (its row of ``P`` set to zero, ``R_i = 0``) when
    ``R_i^2 = |g_i'|^2 / |g_i|^2 < rcond``: ``g_i`` lies in the span of the others to working
    precision. In the closed-form regime this never happens (``R_i^2 = 1/[C^-1]_ii >=
    lambda_min(C) > rcond``). Zero-gradient tasks (``M_ii <= eps * max_k M_kk``, or all of them
    when every gradient is zero) get a zero row and column and ``R_i = 0``.

    ``only_if_conflict=True`` [R] projects only the tasks that conflict with at least one other
    task (``M_ij < 0`` for some ``j != i``); the other tasks keep ``g_i' = g_i`` (``R_i = 1``). The
    non-conflict guarantee survives: an unprojected ``g_i`` has ``g_j . g_i >= 0`` for all ``j``.

    Args:
        gram: ``(K, K)`` Gram matrix ``M_ij = g_i . g_j`` (symmetric positive semi-definite).
        only_if_conflict: see above (default ``False``: every task is projected, as in the paper).
        solver: ``"auto"`` (default), ``"closed_form"`` or ``"lstsq"``.
        rcond: relative threshold for the numerical rank (default ``1e-10``).
        eps: relative threshold on squared norms for zero-gradient tasks (default ``1e-30``).

    Returns:
        ``(P, info)``: ``P`` float64 ``(K, K)``; ``info`` holds ``ratios`` (``R_i = |g_i'| /
        |g_i|``, float64 ``(K,)``), ``vanished`` (bool ``(K,)``: ``g_i' = 0``, zero-gradient tasks
        included), ``zero`` (bool ``(K,)``: zero-gradient tasks), ``projected`` (bool ``(K,)``),
        ``solver`` (``"closed_form"``, ``"lstsq"`` or ``"none"`` when nothing was projected),
        ``rank`` (numerical rank of the non-zero gradients) and ``cond`` (condition number of
        ``C``, ``inf`` when singular).
    """
    m, device = _as_gram(gram)
    solver = _check_choice("solver", solver, _SOLVERS)  # type: ignore[assignment]
    rcond = _check_positive("rcond", rcond)
    eps = _check_positive("eps", eps, allow_zero=True)
    p, info = _projections(m, bool(only_if_conflict), solver, rcond, eps)
    return to_torch(p, device), _infoto_torch(info, device)


def _infoto_torch(info: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: to_torch(v, device) if isinstance(v, np.ndarray) else v for k, v in info.items()}


def _projections(
    m: np.ndarray, only_if_conflict: bool, solver: str, rcond: float, eps: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`gradops_projections` on a validated, symmetric float64 numpy Gram matrix."""
    k = m.shape[0]
    diag = np.clip(np.diag(m), 0.0, None)
    scale = float(diag.max())
    zero = diag <= eps * scale if scale > 0 else np.ones(k, dtype=bool)
    idx = np.flatnonzero(~zero)
    n = idx.size

    projected = ~zero
    if only_if_conflict and n > 0:
        sub = m[np.ix_(idx, idx)].copy()
        np.fill_diagonal(sub, 0.0)
        projected = np.zeros(k, dtype=bool)
        projected[idx] = (sub < 0).any(axis=1)

    p = np.zeros((k, k))
    ratios = np.zeros(k)
    vanished = zero.copy()
    used = "none"
    rank = 0
    cond = math.inf
    if n > 0:
        norms = np.sqrt(diag[idx])
        c = (m if n == k else m[np.ix_(idx, idx)]) / np.outer(norms, norms)
        np.fill_diagonal(c, 1.0)
        evals, evecs = np.linalg.eigh(c)
        lam_max = float(evals[-1])
        lam_min = float(evals[0])
        well = lam_min > rcond * lam_max
        rank = int((evals > rcond * lam_max).sum())
        cond = lam_max / lam_min if well else math.inf
        if solver == "closed_form" and not well:
            raise ValueError(
                "gradops closed form: the Gram matrix is singular to working precision "
                f"(lambda_min/lambda_max = {lam_min / lam_max:.3g} <= rcond = {rcond:g}); the "
                "gradients are linearly dependent, use solver='lstsq' or 'auto'"
            )
        targets = projected[idx]
        pc = np.eye(n)
        if targets.any():
            use_closed = well if solver == "auto" else solver == "closed_form"
            used = "closed_form" if use_closed else "lstsq"
            if use_closed:
                cinv = (evecs / evals) @ evecs.T
                cinv = 0.5 * (cinv + cinv.T)
                full = cinv / np.diag(cinv)[:, None]
            else:
                full = _lstsq_projections(c, rcond)
            pc[targets] = full[targets]
            r2 = np.einsum("ti,ij,tj->t", pc, c, pc)
            gone = targets & (r2 < rcond)
            pc[gone] = 0.0
            vanished[idx[gone]] = True
            ratios[idx] = np.where(targets, np.sqrt(np.clip(r2, 0.0, 1.0)), 1.0)
            ratios[idx[gone]] = 0.0
        else:
            ratios[idx] = 1.0
        pc *= np.outer(norms, 1.0 / norms)
        if n == k:
            p = pc
        else:
            p[np.ix_(idx, idx)] = pc

    info: dict[str, Any] = {
        "ratios": ratios,
        "vanished": vanished,
        "zero": zero,
        "projected": projected & ~zero,
        "solver": used,
        "rank": rank,
        "cond": cond,
    }
    return p, info


def _lstsq_projections(c: np.ndarray, rcond: float) -> np.ndarray:
    """Row ``t``: ``e_t - a_t`` with ``a_t = pinv(C_JJ) C_Jt`` over ``J = {j != t}``, all at once.

    Task ``t``'s sub-problem is embedded in an ``n x n`` matrix with row and column ``t`` zeroed
    (the extra zero eigenvalue is dropped by the pseudo-inverse, so ``a_t[t] = 0``); one batched
    ``eigh`` solves all ``n`` of them. Eigenvalues ``<= rcond * lambda_max`` of each sub-block are
    treated as zero (minimum-norm least squares).
    """
    n = c.shape[0]
    ar = np.arange(n)
    blocks = np.broadcast_to(c, (n, n, n)).copy()
    blocks[ar, ar, :] = 0.0
    blocks[ar, :, ar] = 0.0
    rhs = c.copy()  # rhs[t] = C[:, t] (C symmetric) without its own entry
    rhs[ar, ar] = 0.0
    lam, vec = np.linalg.eigh(blocks)
    keep = lam > rcond * lam[:, -1:]
    inv = np.divide(1.0, lam, out=np.zeros_like(lam), where=keep)
    coef = np.einsum("tij,tj->ti", vec, inv * np.einsum("tji,tj->ti", vec, rhs))
    out = -coef
    out[ar, ar] = 1.0
    return out


# ---------------------------------------------------------------------- trade-off weights
def gradops_tradeoff_weights(
    ratios: Tensor | np.ndarray, alpha: float = 0.0, *, weight_sum: WeightSum = "K"
) -> Tensor:
    """Trade-off weights ``w(alpha)`` [R] from the ratios ``R_i = |g_i'| / |g_i|``.

    Reconstruction (methods.md 4.C; NOT confirmed from the paper)::

        w_i = s * R_i^alpha / sum_j R_j^alpha ,    s = K (weight_sum="K") or 1 (weight_sum="1")

    ``alpha = 0`` gives equal weights ``s/K``. Rationale: the first-order relative progress of
    task ``i`` along ``G' = sum_j w_j g_j'`` is ``g_i . G' / |g_i|^2 = w_i R_i^2``, so
    ``alpha = -2`` equalises it across tasks, ``alpha < -2`` favours the tasks that share most of
    their gradient with the others, ``alpha > 0`` the most independent ones.

    Vanished projections (``R_i = 0``: zero gradient, or ``g_i`` in the span of the others) are
    excluded from the normaliser and keep the neutral weight ``s/K`` (their ``g_i'`` is zero, so
    it has no effect on the update); the other tasks share ``s * |A| / K`` (``A`` = the
    non-vanished tasks), i.e.
    ``w_i = (s/K) |A| R_i^alpha / sum_{j in A} R_j^alpha``. This keeps ``sum_i w_i = s``, avoids
    ``0^alpha = inf`` for ``alpha < 0``, is continuous in ``alpha`` and equals the formula above
    when nothing vanished. Computed as a softmax of ``alpha log R`` (no overflow for large
    ``|alpha|``).
    """
    alpha = _check_alpha(alpha)
    weight_sum = _check_choice("weight_sum", weight_sum, _WEIGHT_SUMS)  # type: ignore[assignment]
    device = device_of(ratios)
    r = host_array(ratios)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ratios must be a non-empty 1-D tensor, got shape {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError(f"ratios must be finite and non-negative, got {r.tolist()}")
    return to_torch(_tradeoff(r, alpha, _weight_total(weight_sum, r.size)), device)


def _tradeoff(r: np.ndarray, alpha: float, s: float) -> np.ndarray:
    """:func:`gradops_tradeoff_weights` on validated host ratios (``s`` = the weight sum)."""
    k = r.size
    w = np.full(k, s / k)
    active = r > 0
    n_active = int(active.sum())
    if n_active and alpha != 0.0:
        x = alpha * np.log(r[active])
        e = np.exp(x - x.max())
        w[active] = (s * n_active / k) * (e / e.sum())
    return w


# ---------------------------------------------------------------------- coefficients
def gradops_coefficients(
    gram: Tensor | np.ndarray,
    alpha: float = 0.0,
    *,
    only_if_conflict: bool = False,
    fallback: Fallback = "sum",
    weight_sum: WeightSum = "K",
    solver: Solver = "auto",
    rcond: float = DEFAULT_RCOND,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, dict[str, Any]]:
    """GradOPS coefficients ``c`` with ``G' = sum_i w_i g_i' = sum_k c_k g_k``, from the Gram matrix.

    ``c = P^T w`` with ``P`` from :func:`gradops_projections` and ``w`` from
    :func:`gradops_tradeoff_weights` (``alpha = 0``: equal weights, plain GradOPS).

    Fallback [R] (methods.md 4.B; the paper's handling was not retrieved): when every
    projection vanished (each ``g_i`` lies in the span of the others to working precision, e.g.
    the linearly dependent gradients ``(1,0), (0,1), (1,1)``, or all gradients are zero), ``G'``
    is zero and the coefficients are replaced by

    * ``"sum"`` (default): the plain sum ``c = (s/K) 1`` (may conflict; it is what training
      without GradOPS would do),
    * ``"mgda"``: ``c = s * alpha_MGDA``, the min-norm point of the convex hull (non-conflicting),
    * ``"zero"``: ``c = 0`` (no update of the shared part this step).

    Otherwise ``G' != 0``: a surviving projection ``j`` gives ``g_j . G' = w_j R_j^2 |g_j|^2 > 0``.
    Nearly dependent gradients (small ``R_i`` above the ``rcond`` threshold) give a small but
    genuine GradOPS update; raise ``rcond`` to treat them as dependent.

    Args:
        gram: ``(K, K)`` Gram matrix of the task gradients.
        alpha: trade-off exponent (default ``0``).
        only_if_conflict: [R] project only conflicting tasks (default ``False``).
        fallback: ``"sum"`` (default), ``"mgda"`` or ``"zero"``.
        weight_sum: ``"K"`` (default; ``sum_i w_i = K``, so ``alpha = 0`` gives unit weights) or
            ``"1"``.
        solver, rcond, eps: see :func:`gradops_projections`.

    Returns:
        ``(c, extras)``: float64 ``(K,)`` coefficients and a dict with ``tradeoff_weights``
        (``w``), ``ratios`` (``R``), ``fallback`` (bool: whether it fired), ``projections``
        (``P``), and ``vanished``, ``projected``, ``solver``, ``rank``, ``cond`` from
        :func:`gradops_projections`.
    """
    alpha = _check_alpha(alpha)
    fallback = _check_choice("fallback", fallback, _FALLBACKS)  # type: ignore[assignment]
    weight_sum = _check_choice("weight_sum", weight_sum, _WEIGHT_SUMS)  # type: ignore[assignment]
    solver = _check_choice("solver", solver, _SOLVERS)  # type: ignore[assignment]
    rcond = _check_positive("rcond", rcond)
    eps = _check_positive("eps", eps, allow_zero=True)
    m, device = _as_gram(gram)
    c, extras = _gradops_coefficients_np(
        m,
        alpha,
        only_if_conflict=bool(only_if_conflict),
        fallback=fallback,
        weight_sum=weight_sum,
        solver=solver,
        rcond=rcond,
        eps=eps,
    )
    return to_torch(c, device), _infoto_torch(extras, device)


def _gradops_coefficients_np(
    m: np.ndarray,
    alpha: float,
    *,
    only_if_conflict: bool,
    fallback: str,
    weight_sum: str,
    solver: str,
    rcond: float,
    eps: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`gradops_coefficients` on a validated, symmetric float64 host Gram matrix.

    Returns ``(c, extras)`` with NumPy arrays and Python scalars only; the options must already
    be validated.
    """
    p, info = _projections(m, only_if_conflict, solver, rcond, eps)
    k = m.shape[0]
    s = _weight_total(weight_sum, k)
    w = _tradeoff(info["ratios"], alpha, s)
    c = p.T @ w
    fired = bool(info["vanished"].all())
    if fired:
        if fallback == "sum":
            c = np.full(k, s / k)
        elif fallback == "zero":
            c = np.zeros(k)
        else:
            c = s * _min_norm_weights_np(m)
    extras: dict[str, Any] = {
        "tradeoff_weights": w,
        "ratios": info["ratios"],
        "fallback": fired,
        "projections": p,
        "vanished": info["vanished"],
        "projected": info["projected"],
        "solver": info["solver"],
        "rank": info["rank"],
        "cond": info["cond"],
    }
    return np.ascontiguousarray(c), extras


# ---------------------------------------------------------------------- the optimizer wrapper
class GradOPS(BalancedOptimizer):
    """GradOPS: each task gradient projected onto the orthogonal complement of the others.

    Formula (Zhu et al., "Gradient Deconfliction via Orthogonal Projections onto Subspaces for
    Multi-task Learning", WSDM 2025, arXiv 2503.03438)::

        g_i' = g_i - P_{span{g_j : j != i}} g_i          (= sum_k [M^-1]_{ki} g_k / [M^-1]_{ii})
        G'   = sum_i w_i g_i'  = sum_k c_k g_k ,   c = P^T w

    computed from the Gram matrix only (:func:`gradops_coefficients`), so it works with
    ``representation=`` (gradients with respect to the balance point) and with
    ``shared_parameters=``. ``G'`` never conflicts with any original task gradient:
    ``g_j . G' = w_j |g_j'|^2 >= 0``.

    Reconstructed parts [R] (methods.md section 4; not the paper's confirmed formulas): the
    trade-off weights ``w_i = s R_i^alpha / sum_j R_j^alpha`` with ``R_i = |g_i'|/|g_i|``
    (``alpha = -2`` equalises the first-order relative progress ``w_i R_i^2``; see
    :func:`gradops_tradeoff_weights`), the fallback when ``G'`` vanishes, and
    ``only_if_conflict``.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        alpha: trade-off exponent (default ``0.0``: equal weights).
        only_if_conflict: [R] project only tasks that conflict with another task (default
            ``False``: always project, as the paper's Fig. 1 describes).
        fallback: [R] ``"sum"`` (default), ``"mgda"`` or ``"zero"``: coefficients used when
            every projection vanished (``G' = 0``; see :func:`gradops_coefficients`).
        weight_sum: ``"K"`` (default) or ``"1"``: ``sum_i w_i``.
        rcond: relative rank threshold (default ``1e-10``); eps: relative squared-norm threshold
            for zero-gradient tasks (default ``1e-30``). See :func:`gradops_projections`.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.extras``: ``tradeoff_weights``, ``ratios``, ``fallback`` (bool),
    ``projections``, ``vanished``, ``projected``, ``solver``, ``rank``, ``cond``. The number of
    steps on which the fallback fired is kept in ``balancer_state["num_fallbacks"]``
    (checkpointed).

    Cost: the per-task gradients and their Gram matrix (done by the base class) plus
    ``O(K^3)`` on a ``K x K`` matrix; no projected gradient is materialised.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        alpha: float = 0.0,
        only_if_conflict: bool = False,
        fallback: Fallback = "sum",
        weight_sum: WeightSum = "K",
        rcond: float = DEFAULT_RCOND,
        eps: float = DEFAULT_EPS,
        **kwargs: Any,
    ) -> None:
        alpha = _check_alpha(alpha)
        if not isinstance(only_if_conflict, bool):
            raise ValueError(f"only_if_conflict must be a bool, got {only_if_conflict!r}")
        fallback = _check_choice("fallback", fallback, _FALLBACKS)  # type: ignore[assignment]
        weight_sum = _check_choice("weight_sum", weight_sum, _WEIGHT_SUMS)  # type: ignore[assignment]
        rcond = _check_positive("rcond", rcond)
        eps = _check_positive("eps", eps, allow_zero=True)
        super().__init__(optimizer, num_tasks, **kwargs)
        self.alpha = alpha
        self.only_if_conflict = only_if_conflict
        self.fallback = fallback
        self.weight_sum = weight_sum
        self.rcond = rcond
        self.eps = eps
        self.balancer_state = {"num_fallbacks": 0}
        self._last: dict[str, Any] = {}

    def _repr_options(self) -> str:
        return (
            f"alpha={self.alpha}, only_if_conflict={self.only_if_conflict}, "
            f"fallback={self.fallback!r}, weight_sum={self.weight_sum!r}, "
            f"{super()._repr_options()}"
        )

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer_state = {"num_fallbacks": int(state.get("num_fallbacks", 0))}

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> np.ndarray:
        """:func:`_gradops_coefficients_np` on the host copy of the Gram matrix."""
        if gram is None:
            raise RuntimeError("GradOPS needs the Gram matrix of the task gradients")
        c, extras = _gradops_coefficients_np(
            _check_gram_np(host_array(gram)),
            self.alpha,
            only_if_conflict=self.only_if_conflict,
            fallback=self.fallback,
            weight_sum=self.weight_sum,
            solver="auto",
            rcond=self.rcond,
            eps=self.eps,
        )
        if extras["fallback"]:
            self.balancer_state["num_fallbacks"] = (
                int(self.balancer_state.get("num_fallbacks", 0)) + 1
            )
        self._last = extras
        return c

    def _extras(self) -> dict[str, Any]:
        return {
            k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v
            for k, v in self._last.items()
        }
