"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): the Nash
bargaining solution ``M alpha = 1 / alpha``.

The weighting is a pure function of the Gram matrix :func:`nashmtl_weights` (an exact damped
Newton solve, no convex-optimisation package); the class :class:`NashMTL` applies it at either
level (representation or shared parameters) and adds the paper's update schedule and norm cap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import NonFiniteError

from ._host import check_gram, device_of, host_array, to_torch
from ._learned import LearnedStateBalancer, check_state_keys, state_vector
from ._options import check_positive
from .upgrad import _cosines

__all__ = ["NashMTL", "nashmtl_weights"]

_EPS = float(np.finfo(np.float64).eps)
_STATE_KEYS = ("alpha", "step")
#: the ridge is dropped (a Newton polish) when its relative effect on the equation is below this
_POLISH_LIMIT = 1e-6
#: Newton steps of that polish (it starts next to the solution: 1-3 are typical)
_POLISH_STEPS = 10


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int >= minimum`` (TypeError for a non-int or a bool, else ValueError)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _newton(
    c: np.ndarray, beta: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, float, int, bool]:
    """Damped Newton on ``phi(beta) = 1/2 beta^T C beta - sum_k log beta_k`` from ``beta > 0``.

    ``phi`` is self-concordant, so the Newton step ``Delta`` with decrement ``delta`` taken with
    length ``1 / (1 + delta)`` while ``delta >= 1/4`` and ``1`` afterwards stays positive and
    converges from any start, quadratically at the end (Nesterov & Nemirovski), whenever the
    minimiser exists. The system is solved in the scaled form
    ``(diag(beta) C diag(beta) + I) (Delta / beta) = 1 - beta * C beta``, whose matrix is
    ``>= I``. Returns ``(beta, residual, iterations, converged)`` with
    ``residual = max_k |beta_k (C beta)_k - 1|``; converged: ``residual <= tol`` plus the
    round-off of those products.
    """
    n = beta.shape[0]
    iterations = 0
    while True:
        r = beta * (c @ beta) - 1.0
        residual = float(np.abs(r).max())
        roundoff = 8.0 * n * _EPS * float((beta * (np.abs(c) @ beta)).max())
        if residual <= tol + roundoff:
            return beta, residual, iterations, True
        if iterations >= max_iter:
            return beta, residual, iterations, False
        h = beta[:, None] * c * beta[None, :] + np.eye(n)
        step = np.linalg.solve(h, -r)  # Delta / beta
        dec2 = -float(r @ step)  # the squared Newton decrement
        if dec2 <= 1e-30:  # no progress left at working precision
            return beta, residual, iterations, False
        dec = float(np.sqrt(dec2))
        beta = beta * (1.0 + (1.0 if dec < 0.25 else 1.0 / (1.0 + dec)) * step)
        iterations += 1


def _nash_solve_np(
    gram: np.ndarray,
    alpha0: np.ndarray | None = None,
    *,
    ridge: float = 1e-12,
    max_iter: int = 100,
    tol: float = 1e-13,
) -> tuple[np.ndarray, float, int]:
    """The solution ``alpha > 0`` of ``M alpha = 1 / alpha`` (regularised when needed).

    Solved in the cosine coordinates ``beta_k = alpha_k |g_k|``, ``C = D^-1/2 M D^-1/2``, where
    the equation reads ``C beta = 1/beta``: first for ``C + ridge I`` (i.e.
    ``M + ridge diag M``: a unique solution always exists) by :func:`_newton`; then, when the
    ridge's effect ``ridge max_k beta_k^2`` is at most ``1e-6``, polished without it by a few
    more Newton steps (kept if they converge), so that ``M alpha = 1/alpha`` holds to round-off
    whenever its solution is well-posed.

    Returns ``(alpha, residual, iterations)`` with ``residual = max_k |alpha_k (M' alpha)_k - 1|``
    for the matrix ``M'`` finally solved (``M`` after a polish, else the regularised one). Zero
    gradients get ``alpha_k = 0``; ``alpha0`` (a previous solution) is the warm start when it is
    positive and finite on the non-zero tasks.
    """
    m = check_gram(gram)
    k = m.shape[0]
    alpha = np.zeros(k)
    c, _, active = _cosines(m)
    if not active.any():
        return alpha, 0.0, 0
    n = int(active.sum())
    real_norms = np.sqrt(np.diagonal(m)[active])
    beta: np.ndarray | None = None
    if alpha0 is not None and alpha0.shape == (k,):
        b0 = alpha0[active] * real_norms
        if np.isfinite(b0).all() and (b0 > 0).all():
            beta = b0
    if beta is None:  # the exact solution when all cosines are equal
        total = float(c.sum())
        beta = np.full(n, np.sqrt(n / total) if total > 0 else 1.0)
    beta, residual, iterations, _ = _newton(c + ridge * np.eye(n), beta, max_iter, tol)
    if ridge > 0.0 and ridge * float(np.max(beta * beta)) <= _POLISH_LIMIT:
        polished, res, extra, ok = _newton(c, beta, _POLISH_STEPS, tol)
        if ok and np.isfinite(polished).all() and (polished > 0).all():
            beta, residual, iterations = polished, res, iterations + extra
    alpha[active] = beta / real_norms
    return alpha, residual, iterations


def _cap(gram: np.ndarray, alpha: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """``(c, |d|)``: ``alpha`` scaled down so that ``|d| = sqrt(c^T M c) <= max_norm``
    (``max_norm = 0``: no cap); ``|d|`` is that of ``alpha``."""
    norm = float(np.sqrt(max(float(alpha @ gram @ alpha), 0.0)))
    if max_norm > 0.0 and norm > max_norm:
        return alpha * (max_norm / norm), norm
    return alpha.copy(), norm


def nashmtl_weights(
    gram: Tensor | np.ndarray,
    *,
    max_norm: float = 0.0,
    ridge: float = 1e-12,
    max_iter: int = 100,
    tol: float = 1e-13,
) -> Tensor:
    """Nash-MTL coefficients from a Gram matrix (one stateless solve): a pure function.

    ``alpha > 0`` with ``(M + ridge diag M) alpha = 1 / alpha`` (zero gradients: 0), scaled down
    so that ``|sum_k alpha_k g_k| <= max_norm`` when ``max_norm > 0`` (default 0 here: the bare
    solution; :class:`NashMTL` caps at 1 by default). See :class:`NashMTL`.

    Returns:
        ``(K,)`` float64 coefficients on ``gram``'s device (CPU for NumPy input).
    """
    mn = check_positive("max_norm", max_norm, allow_zero=True)
    rg = check_positive("ridge", ridge, allow_zero=True)
    mi = _check_int("max_iter", max_iter, 1)
    tl = check_positive("tol", tol)
    m = check_gram(host_array(gram))
    alpha, _, _ = _nash_solve_np(m, ridge=rg, max_iter=mi, tol=tl)
    c, _ = _cap(m, alpha, mn)
    return to_torch(c, device_of(gram))


class NashMTL(LearnedStateBalancer):
    """Nash-MTL: the Nash bargaining solution of the tasks' utilities ``log(g_k . d)``.

    Formula (Navon et al. 2022, Theorem 5.1 and Algorithm 1): ``alpha > 0`` solving::

        M alpha = 1 / alpha        (element-wise; M the Gram matrix)
        d = sum_k alpha_k g_k      so that  alpha_k (g_k . d) = 1  for every task

    ``alpha`` is the unique minimiser of the strictly convex
    ``1/2 alpha^T M alpha - sum_k log alpha_k`` when ``M`` is positive definite; it is found by
    a damped Newton method on that function (exact to ``tol``, typically 5-10 steps; see
    :func:`balancers.nashmtl._nash_solve_np`), in cosine coordinates so that gradient norms
    spanning many orders of magnitude are harmless. The paper's reference code (and TorchJD)
    instead run up to 20 rounds of a sequential convex approximation with cvxpy/ECOS and stop at
    a loose tolerance; the fixed point is the same.

    Choices where ``M`` is singular (not covered by the paper, which assumes independent
    gradients): the equation is first solved for ``M + ridge diag(M)`` (``ridge`` relative to
    each task's squared gradient norm, default ``1e-12``), which always has a unique solution;
    when the relative error this adds, ``ridge (alpha_k |g_k|)^2``, is at most ``1e-6`` the
    solution is polished on ``M`` itself by a few Newton steps, so ``M alpha = 1/alpha`` holds
    to round-off whenever its solution is well-posed. Otherwise (nearly dependent gradients,
    e.g. two opposite ones, where the exact solution does not exist or is huge) the regularised
    solution is kept: its weights stay finite and ``|d|^2 = K - ridge sum_k (alpha_k |g_k|)^2
    <= K``. A zero gradient (``M_kk = 0``) gets ``alpha_k = 0`` (its weight changes nothing) and
    the others are solved among themselves.

    Schedule and cap (the paper's Algorithm 1 and reference code, TorchJD's defaults):

    * ``update_every``: ``alpha`` is recomputed on the first call and then every
      ``update_every``-th call; in between the last ``alpha`` is reused (with the current Gram
      matrix for the cap). Default 1 (every step).
    * ``max_norm``: the coefficients are scaled down so that ``|d| <= max_norm`` (``0``
      disables). At the solution ``|d|^2 = alpha^T M alpha = K``, so the default ``1.0`` divides
      ``alpha`` by ``sqrt(K)`` (the reference code clips the shared gradient norm to 1 with
      ``clip_grad_norm_``; TorchJD rescales ``alpha`` like here). At the representation level
      the cap applies to the combined representation gradient.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        update_every: recompute ``alpha`` every this many calls (int >= 1, default 1).
        max_norm: cap on ``|d|`` (default 1.0; 0 = no cap).
        ridge: relative regularisation of singular Gram matrices (default 1e-12).
        max_iter: Newton steps per solve (default 100; the solve is warm-started from the
            previous ``alpha``).
        tol: stop when ``max_k |alpha_k (M alpha)_k - 1| <= tol`` (default 1e-13; plus the
            round-off of the products).
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    State (``balancer_state``, saved by ``state_dict`` and restored when a step is skipped):
    ``alpha``, the last solution before the cap (a list of K floats: reading it back needs no
    torch call, and it loads with ``torch.load(weights_only=True)``; a tensor or array put there
    is accepted and converted once), and ``step``, the number of calls so far (an int);
    ``reset_state()`` forgets both (the next call solves afresh). Cost per update on the host: a
    few K x K linear solves.

    ``BalanceInfo.extras``: ``alpha`` (before the cap), ``direction_norm`` (``|d|`` before the
    cap), ``updated`` (whether ``alpha`` was recomputed this call), ``residual``
    (``max_k |alpha_k (M' alpha)_k - 1|`` for the matrix finally solved, see
    :func:`balancers.nashmtl._nash_solve_np`; 0 when not updated) and
    ``iterations``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        update_every: int = 1,
        max_norm: float = 1.0,
        ridge: float = 1e-12,
        max_iter: int = 100,
        tol: float = 1e-13,
        **kwargs: Any,
    ) -> None:
        self.update_every = _check_int("update_every", update_every, 1)
        self.max_norm = check_positive("max_norm", max_norm, allow_zero=True)
        self.ridge = check_positive("ridge", ridge, allow_zero=True)
        self.max_iter = _check_int("max_iter", max_iter, 1)
        self.tol = check_positive("tol", tol)
        super().__init__(optimizer, num_tasks, **kwargs)

    def _repr_options(self) -> str:
        return (
            f"update_every={self.update_every}, max_norm={self.max_norm}, ridge={self.ridge}, "
            f"{super()._repr_options()}"
        )

    # -- state
    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Validate, then replace the state (a rejected state changes nothing)."""
        if not check_state_keys(state, _STATE_KEYS, "NashMTL"):
            self.balancer_state = {}
            return
        a = state_vector(state["alpha"], "alpha", "NashMTL", self.num_tasks)
        if (a < 0).any():
            raise ValueError(f"NashMTL state 'alpha' must be >= 0, got {a.tolist()}")
        step = state["step"]
        if isinstance(step, Tensor):
            step = int(step.item()) if step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"NashMTL state 'step' must be an int >= 0, got {step!r}")
        self.balancer_state = {"alpha": [float(x) for x in a], "step": int(step)}

    def _previous(self, k: int) -> tuple[np.ndarray | None, int]:
        st = self.balancer_state
        step = int(st.get("step", 0))
        a = st.get("alpha")
        if a is None:
            return None, step
        # a list of floats (set by this class): no torch call; anything else (set from
        # outside) goes through the validation of _load_balancer_state_dict first
        if not isinstance(a, list):
            self._load_balancer_state_dict(dict(st))
            a = self.balancer_state["alpha"]
        alpha = np.array(a, dtype=np.float64)
        if alpha.shape != (k,):
            raise ValueError(f"NashMTL state is for {alpha.shape[0]} tasks, this step has {k}")
        return alpha, step

    # -- the method
    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Solve (on schedule) or reuse ``alpha``, cap it, advance the state.

        The state is replaced only once the new ``alpha`` is known to be finite.
        """
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        m = check_gram(gram)
        k = m.shape[0]
        previous, step = self._previous(k)
        update = previous is None or step % self.update_every == 0
        residual, iterations = 0.0, 0
        if update:
            alpha, residual, iterations = _nash_solve_np(
                m, previous, ridge=self.ridge, max_iter=self.max_iter, tol=self.tol
            )
        else:
            assert previous is not None
            alpha = previous.copy()
        if not np.isfinite(alpha).all():  # state untouched
            raise NonFiniteError(f"NashMTL produced non-finite weights {alpha.tolist()}")
        c, norm = _cap(m, alpha, self.max_norm)
        self.balancer_state = {"alpha": alpha.tolist(), "step": step + 1}
        extras = {
            "alpha": alpha,
            "direction_norm": np.float64(norm),
            "updated": bool(update),
            "residual": np.float64(residual),
            "iterations": int(iterations),
        }
        return c, extras
