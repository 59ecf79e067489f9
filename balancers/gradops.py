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

Fidelity (``docs/methods.md``, GradOPS; the method reference's section 4): the projection and the
non-conflict guarantee are the paper's [A]; the trade-off weights ``w(alpha)``, the fallback for
dependent gradients and ``only_if_conflict`` are documented reconstructions [R], not the paper's
formulas.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, device_of, host_array, host_gram, to_torch
from ._min_norm import _min_norm_weights_np
from ._options import check_bool, check_choice, check_positive, check_real

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
#: default relative threshold on squared gradient norms below which a task counts as zero: 0, only
#: an exactly zero gradient (every other one has a direction, used through the normalised Gram)
DEFAULT_EPS = 0.0


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

    All decisions and projections come from ONE eigendecomposition ``C = V diag(lambda) V^T``.
    Eigenvalues ``lambda <= rcond * lambda_max`` span the numerical null space ``N`` (the linear
    dependencies ``sum_k a_k g_k/|g_k| = 0``; ``rank = K - dim N``), and
    ``C^+ = V_R diag(1/lambda_R) V_R^T`` is the inverse on the rest:

    * task ``i`` takes part in a dependency when its *null leverage*
      ``l_i = sum_{v in N} v_i^2`` exceeds ``rcond^2`` (``u_i`` has a coefficient above ``rcond``
      in a unit null combination), or the round-off level of the computed null space when that
      is larger: ``g_i`` lies in the span of the others, its projection is declared *vanished*
      (row of ``P`` zero, ``R_i = 0``);
    * otherwise ``P_C[i, k] = [C^+]_{ik} / [C^+]_{ii}`` and ``R_i^2 = 1 / [C^+]_{ii}``: the exact
      projection (``e_i`` is orthogonal to ``N``, so ``C P_C[i]^T = e_i / [C^+]_ii``); with a
      non-singular ``C`` this is the closed form ``[C^-1]_{ik} / [C^-1]_{ii}``.

    The eigendecomposition of a relabelled ``C`` is the relabelled one (up to round-off), so the
    decisions do not depend on the order of the tasks; they depend on the directions only, so
    they do not depend on the gradients' norms either. ``R_i^2 >= lambda_min(range) > rcond
    lambda_max >= rcond`` for every projection that survives.

    * ``solver="auto"`` (default) and ``solver="lstsq"`` compute the above (``info["solver"]`` is
      ``"closed_form"`` when ``C`` is non-singular under ``"auto"``, else ``"lstsq"``);
      ``solver="closed_form"`` raises ``ValueError`` when ``C`` is singular to working
      precision (``lambda_min(C) <= rcond * lambda_max(C)``).

    Zero-gradient tasks (``M_ii = 0``, or ``M_ii <= eps * max_k M_kk`` with a positive ``eps``)
    get a zero row and column and ``R_i = 0``. A tiny but non-zero gradient keeps its direction
    (the decisions use the normalised ``C``), so the result does not depend on how its norm
    compares with the others'.

    ``only_if_conflict=True`` [R] projects only the tasks that conflict with at least one other
    task (``M_ij < 0`` for some ``j != i``); the other tasks keep ``g_i' = g_i`` (``R_i = 1``). The
    non-conflict guarantee survives: an unprojected ``g_i`` has ``g_j . g_i >= 0`` for all ``j``.

    Args:
        gram: ``(K, K)`` Gram matrix ``M_ij = g_i . g_j`` (symmetric positive semi-definite).
        only_if_conflict: see above (default ``False``: every task is projected, as in the paper).
        solver: ``"auto"`` (default), ``"closed_form"`` or ``"lstsq"``.
        rcond: relative threshold for the numerical rank and the null leverage (default
            ``1e-10``).
        eps: tasks with ``M_ii <= eps * max_k M_kk`` count as zero gradients (default ``0``:
            only exactly zero ones; a positive ``eps`` makes the result depend on the largest
            gradient's norm).

    Returns:
        ``(P, info)``: ``P`` float64 ``(K, K)``; ``info`` holds ``ratios`` (``R_i = |g_i'| /
        |g_i|``, float64 ``(K,)``), ``vanished`` (bool ``(K,)``: ``g_i' = 0``, zero-gradient tasks
        included), ``zero`` (bool ``(K,)``: zero-gradient tasks), ``projected`` (bool ``(K,)``),
        ``solver`` (``"closed_form"``, ``"lstsq"`` or ``"none"`` when nothing was projected),
        ``rank`` (numerical rank of the non-zero gradients) and ``cond`` (condition number of
        ``C``, ``inf`` when singular).
    """
    m, device = host_gram(gram)
    solver = check_choice("solver", solver, _SOLVERS)  # type: ignore[assignment]
    rcond = check_positive("rcond", rcond)
    eps = check_positive("eps", eps, allow_zero=True)
    p, info = _projections(m, bool(only_if_conflict), solver, rcond, eps)
    return to_torch(p, device), _infoto_torch(info, device)


def _infoto_torch(info: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: to_torch(v, device) if isinstance(v, np.ndarray) else v for k, v in info.items()}


#: float64 machine epsilon (2^-52)
_EPS = float(np.finfo(np.float64).eps)


def _leverage_threshold(evals: np.ndarray, null: np.ndarray, rcond: float) -> float:
    """Null leverage above which a task counts as part of a linear dependency.

    ``rcond^2`` (a coefficient above ``rcond`` in a unit null combination), raised to the
    round-off of the computed null space when that is larger: ``(100 n eps lambda_max / gap)^2``
    with ``gap`` the distance between the null and the kept eigenvalues (Davis-Kahan). A task not
    involved in any dependency has a computed leverage far below it, in any task order; a
    surviving projection is orthogonal to the other gradients up to ``sqrt`` of it.
    """
    if not null.any():
        return math.inf
    n = evals.size
    gap = float(evals[~null].min()) - max(float(evals[null].max()), 0.0)
    noise = 100.0 * n * _EPS * float(evals[-1]) / gap if gap > 0 else math.inf
    return max(rcond * rcond, min(noise * noise, 1.0))


def _conflicting(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The tasks among ``idx`` (the non-zero gradients) with a negative inner product with
    another of them (``only_if_conflict``), as a ``(K,)`` mask."""
    sub = m[np.ix_(idx, idx)].copy()
    np.fill_diagonal(sub, 0.0)
    projected = np.zeros(m.shape[0], dtype=bool)
    projected[idx] = (sub < 0).any(axis=1)
    return projected


def _normalised_projections(
    evals: np.ndarray, evecs: np.ndarray, null: np.ndarray, targets: np.ndarray, rcond: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The projections of the unit gradients ``u_i = g_i/|g_i|`` marked by ``targets``, from the
    eigendecomposition ``(evals, evecs)`` of the normalised Gram matrix ``C`` (``null``: its
    numerical null space).

    Returns ``(pc, gone, r2)``: ``pc[i, k]`` the coefficient of ``u_k`` in ``u_i'`` (row ``e_i``
    for a task not projected, 0 for a vanished one), ``gone`` the targets whose projection
    vanishes, ``r2`` the squared ratios ``|u_i'|^2`` of the surviving targets (0 elsewhere).
    """
    n = evals.size
    pc = np.eye(n)
    # C^+ on the numerical range; e_i's weight in the numerical null space says whether
    # u_i = g_i/|g_i| takes part in a linear dependency (then g_i lies in the span of
    # the others and g_i' = 0)
    keep = ~null
    cplus = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T
    cplus = 0.5 * (cplus + cplus.T)
    leverage = (evecs[:, null] ** 2).sum(axis=1)
    gone = targets & (leverage > _leverage_threshold(evals, null, rcond))
    live = targets & ~gone
    inv_diag = np.diag(cplus)
    pc[live] = cplus[live] / inv_diag[live, None]
    pc[gone] = 0.0
    r2 = np.zeros(n)
    r2[live] = 1.0 / inv_diag[live]
    return pc, gone, r2


def _projections(
    m: np.ndarray, only_if_conflict: bool, solver: str, rcond: float, eps: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`gradops_projections` on a validated, symmetric float64 numpy Gram matrix.

    Every decision comes from quantities that are equivariant under a relabelling of the tasks
    and invariant under a rescaling of any gradient: the zero test compares ``M_ii`` with
    ``max_k M_kk``, and the rank, the vanished projections and the projections themselves all come
    from ONE eigendecomposition of the normalised Gram matrix ``C``.
    """
    k = m.shape[0]
    diag = np.clip(np.diag(m), 0.0, None)
    scale = float(diag.max())
    zero = (diag <= eps * scale) | (diag == 0.0) if scale > 0 else np.ones(k, dtype=bool)
    idx = np.flatnonzero(~zero)
    n = idx.size

    projected = _conflicting(m, idx) if only_if_conflict and n > 0 else ~zero

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
        null = evals <= rcond * lam_max
        well = not null.any()
        rank = int(n - null.sum())
        cond = lam_max / float(evals[0]) if well else math.inf
        if solver == "closed_form" and not well:
            lam_min = float(evals[0])
            raise ValueError(
                "gradops closed form: the Gram matrix is singular to working precision "
                f"(lambda_min/lambda_max = {lam_min / lam_max:.3g} <= rcond = {rcond:g}); the "
                "gradients are linearly dependent, use solver='lstsq' or 'auto'"
            )
        targets = projected[idx]
        if targets.any():
            used = "closed_form" if well and solver != "lstsq" else "lstsq"
            pc, gone, r2 = _normalised_projections(evals, evecs, null, targets, rcond)
            vanished[idx[gone]] = True
            ratios[idx] = np.where(targets, np.sqrt(np.clip(r2, 0.0, 1.0)), 1.0)
        else:
            pc = np.eye(n)
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
    alpha = check_real("alpha", alpha)
    weight_sum = check_choice("weight_sum", weight_sum, _WEIGHT_SUMS)  # type: ignore[assignment]
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
    alpha = check_real("alpha", alpha)
    fallback = check_choice("fallback", fallback, _FALLBACKS)  # type: ignore[assignment]
    weight_sum = check_choice("weight_sum", weight_sum, _WEIGHT_SUMS)  # type: ignore[assignment]
    solver = check_choice("solver", solver, _SOLVERS)  # type: ignore[assignment]
    rcond = check_positive("rcond", rcond)
    eps = check_positive("eps", eps, allow_zero=True)
    m, device = host_gram(gram)
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
            for zero-gradient tasks (default ``0``: exactly zero only). See
            :func:`gradops_projections`.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.weights`` are *coefficients* ``c`` with ``G' = sum_i c_i g_i`` (the projected
    update expanded over the original gradients; ``weights_kind = "coefficients"``): they can be
    negative and large when the gradients are nearly dependent, e.g. ``[26, -105, 1]``. The
    trade-off weights ``w`` are in ``extras["tradeoff_weights"]``.

    ``BalanceInfo.extras``: ``tradeoff_weights``, ``ratios``, ``fallback`` (bool),
    ``projections``, ``vanished``, ``projected``, ``solver``, ``rank``, ``cond``. The number of
    steps on which the fallback fired is kept in ``balancer_state["num_fallbacks"]``
    (checkpointed).

    Cost: the per-task gradients and their Gram matrix (done by the base class) plus
    ``O(K^3)`` on a ``K x K`` matrix; no projected gradient is materialised.
    """

    weights_kind = "coefficients"

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
        alpha = check_real("alpha", alpha)
        only_if_conflict = check_bool("only_if_conflict", only_if_conflict)
        fallback = check_choice("fallback", fallback, _FALLBACKS)  # type: ignore[assignment]
        weight_sum = check_choice("weight_sum", weight_sum, _WEIGHT_SUMS)  # type: ignore[assignment]
        rcond = check_positive("rcond", rcond)
        eps = check_positive("eps", eps, allow_zero=True)
        super().__init__(optimizer, num_tasks, **kwargs)
        self.alpha = alpha
        self.only_if_conflict = only_if_conflict
        self.fallback = fallback
        self.weight_sum = weight_sum
        self.rcond = rcond
        self.eps = eps
        self.balancer_state = {"num_fallbacks": 0}

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
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`_gradops_coefficients_np` on the host copy of the Gram matrix.

        Returns ``(c, extras)``; counts the fallback in ``balancer_state["num_fallbacks"]``.
        """
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        c, extras = _gradops_coefficients_np(
            check_gram(gram),
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
        return c, extras
