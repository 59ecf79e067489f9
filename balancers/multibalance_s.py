"""MultiBalance as ONE third-party summary describes it [S]: an MGDA-type rule on
magnitude-normalised representation gradients, one projected-gradient step per training step.

This is NOT the MultiBalance paper's method (He et al., arXiv 2411.11871; its weight rule was not
available, see ``reference/methods.md`` section 2): it implements the description in a blog post
on gradient balancing in multi-task recommendation (``reference/baselines.md``, "MultiBalance as
a third-party summary describes it [S]"). Every constant (``gamma = 0.01``, ``rho = 0.1``,
``beta = 1``) comes from that post's pseudocode and is unverified. The repository's
:class:`balancers.MultiBalance` is a different, MetaBalance-grounded reconstruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import NonFiniteError

from ._host import check_gram, device_of, host_array, to_torch
from ._learned import HostVectorBalancer, finite_vector
from ._min_norm import _project_simplex_np
from ._options import check_positive

__all__ = ["MultiBalanceS", "multibalance_s_step"]

#: tolerance of ``sum(lam) = 1`` when a state is loaded
_SIMPLEX_ATOL = 1e-6
#: a task whose rescaling ``u_k / ||h_k||`` exceeds this counts as having a zero gradient: its
#: coefficient would overflow a float32 gradient row (max ~3.4e38)
_MAX_RESCALE = 1e30


# ---------------------------------------------------------------------- option checks
def _check_gamma(gamma: Any) -> float:
    v = check_positive("gamma", gamma)
    if v > 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    return v


def _check_beta(beta: Any) -> float:
    return check_positive("beta", beta, allow_zero=True)


def _check_rho(rho: Any) -> float:
    return check_positive("rho", rho, allow_zero=True)


# ---------------------------------------------------------------------- pure functions
def _multibalance_s_step_np(
    norms_ma: np.ndarray,
    lam: np.ndarray,
    gram: np.ndarray,
    *,
    gamma: float,
    beta: float,
    rho: float,
) -> dict[str, np.ndarray]:
    """One step of :class:`MultiBalanceS` on validated float64 host arrays.

    Returns a dict: ``norms`` (``||h_k||``), ``updated`` (tasks with a usable gradient),
    ``norms_ma`` (``u`` after the update), ``scales`` (``D_kk``), ``rescaled_gram``
    (``D M D``), ``lam`` (``lam`` after the step) and ``coefficients`` (``c``).
    """
    k = lam.shape[0]
    norms = np.sqrt(np.clip(np.diagonal(gram), 0.0, None))
    candidate = (1.0 - gamma) * norms_ma + gamma * norms
    positive = norms > 0
    safe = np.where(positive, norms, 1.0)
    with np.errstate(over="ignore"):
        scale = candidate / safe
    updated = positive & np.isfinite(scale) & (scale <= _MAX_RESCALE)
    u = np.where(updated, candidate, norms_ma)
    d = np.where(updated, scale, 0.0)
    # D M D = u_i u_j cos_ij on the updated tasks (no overflow for tiny norms), 0 elsewhere
    with np.errstate(over="ignore", invalid="ignore"):
        cos = np.clip(gram / safe[:, None] / safe[None, :], -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    mask = updated[:, None] & updated[None, :]
    dmd = np.where(mask, np.outer(u, u) * cos, 0.0)
    anchor = np.full(k, 1.0 / k)
    moved = lam - beta * (dmd @ (lam + rho * anchor))
    # the projection is shift-invariant; shifting the largest entry to 0 keeps a step of 1e23
    # from rounding the whole of lambda away (max - (max - 1) = 0 in float64)
    new_lam = _project_simplex_np(moved - moved.max())
    return {
        "norms": norms,
        "updated": updated,
        "norms_ma": u,
        "scales": d,
        "rescaled_gram": dmd,
        "lam": new_lam,
        "coefficients": new_lam * d,
    }


def multibalance_s_step(
    norms_ma: Tensor | np.ndarray | Sequence[float],
    lam: Tensor | np.ndarray | Sequence[float],
    gram: Tensor | np.ndarray,
    *,
    gamma: float = 0.01,
    beta: float = 1.0,
    rho: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the [S] MultiBalance variant (pure function): ``(u, lam, c)`` after it.

    ``u_k <- (1 - gamma) u_k + gamma ||h_k||``; ``D = diag(u_k / ||h_k||)``;
    ``lam <- proj_simplex(lam - beta (D M D)(lam + rho / K))``; ``c_k = lam_k u_k / ||h_k||``.
    Tasks with a zero gradient keep ``u_k`` and get ``D_kk = c_k = 0``.

    Args:
        norms_ma: ``(K,)`` finite non-negative moving averages ``u``.
        lam: ``(K,)`` weights on the simplex.
        gram: ``(K, K)`` Gram matrix ``M`` (any device, or a NumPy array).
        gamma, beta, rho: as in :class:`MultiBalanceS`.

    Returns:
        float64 ``(u, lam, c)`` on ``gram``'s device (CPU for NumPy input).
    """
    g, b, r = _check_gamma(gamma), _check_beta(beta), _check_rho(rho)
    m = check_gram(host_array(gram))
    k = m.shape[0]
    u = finite_vector(norms_ma, "norms_ma", k)
    if (u < 0).any():
        raise ValueError(f"norms_ma must be non-negative, got {u.tolist()}")
    lam_ = finite_vector(lam, "lam", k)
    _check_simplex(lam_, "lam")
    out = _multibalance_s_step_np(u, lam_, m, gamma=g, beta=b, rho=r)
    device = device_of(gram)
    return (
        to_torch(out["norms_ma"], device),
        to_torch(out["lam"], device),
        to_torch(out["coefficients"], device),
    )


def _check_simplex(lam: np.ndarray, name: str) -> None:
    if (lam < 0).any() or abs(float(lam.sum()) - 1.0) > _SIMPLEX_ATOL:
        raise ValueError(f"{name} must lie on the simplex (>= 0, sum 1), got {lam.tolist()}")


# ---------------------------------------------------------------------- the optimizer
class MultiBalanceS(HostVectorBalancer):
    """MultiBalance as a third-party summary describes it [S] -- NOT the paper's method.

    Per step, with ``M`` the Gram matrix of the task gradients ``h_k`` at the balance point
    (all representation tensors together; at parameter level ``g_k`` over all shared
    parameters):

    1. ``u_k <- (1 - gamma) u_k + gamma ||h_k||`` (``||h_k|| = sqrt(M_kk)``; ``u`` starts at 0,
       no bias correction);
    2. ``v_k = (u_k / ||h_k||) h_k``, whose Gram matrix is ``D M D`` with
       ``D = diag(u_k / ||h_k||)`` (computed as ``u_i u_j cos_ij``);
    3. one projected-gradient step on persistent weights ``lam`` (start ``1/K``):
       ``lam <- proj_simplex(lam - beta (D M D)(lam + rho lam_0))``, ``lam_0 = 1/K``;
    4. the trunk receives ``sum_k lam_k v_k``: coefficients ``c_k = lam_k u_k / ||h_k||`` with
       the ``lam`` just updated (step 4 follows step 3 in the summary); heads get their own
       unweighted gradient (``weight_heads=True``: ``c_k grad L_k``).

    Zero gradients (our choice; the summary does not say): a task with ``||h_k|| = 0`` (or so
    small that ``u_k / ||h_k|| > 1e30``) keeps ``u_k``, gets ``D_kk = 0`` (its row and column of
    ``D M D`` are zero) and ``c_k = 0``; its ``lam_k`` moves only through the projection. No NaN.

    Source and fidelity: a blog post on gradient balancing in multi-task recommendation (its
    account of MetaBalance matches the MetaBalance paper) describes MultiBalance (He et al.,
    arXiv 2411.11871) this way and reports ~0.42 % QPS overhead. This is a third-party summary
    [S]; the paper's text was not available; ``gamma``, ``beta`` and ``rho`` are the post's
    pseudocode values and unverified. Never report this as the paper's method. Note the scale:
    ``D M D = u_i u_j cos_ij``, so the ``lam`` step grows with the square of the gradient
    magnitudes, and ``u`` (hence the trunk's gradient) warms up from 0 over ~``1/gamma`` steps.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        gamma: moving-average rate of the norms, in ``(0, 1]`` (default 0.01) [S].
        beta: step size of the ``lam`` update, ``>= 0`` (default 1.0) [S]; 0 freezes ``lam``.
        rho: weight of the pull toward ``lam_0 = 1/K`` inside the step, ``>= 0``
            (default 0.1) [S].
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.weights``: ``c``. ``BalanceInfo.extras``: ``norms`` (``||h_k||``),
    ``norms_ma`` (``u``, after the update), ``scales`` (``D_kk``), ``rescaled_gram``
    (``D M D``), ``lam`` (after the step), ``updated`` (tasks whose ``u_k`` was updated).

    State (``balancer_state``; empty before the first step): ``norms_ma`` ``(K,)`` (``u``) and
    ``lam`` ``(K,)`` (on the simplex), float64 NumPy arrays on the host (read without any device
    access); ``state_dict()`` saves them as CPU float64 tensors. ``reset_state()``: back to
    ``u = 0`` and ``lam = 1/K``.
    """

    requires_gram = True
    per_block = False
    _STATE_KEYS = ("norms_ma", "lam")

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        gamma: float = 0.01,
        beta: float = 1.0,
        rho: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self.gamma = _check_gamma(gamma)
        self.beta = _check_beta(beta)
        self.rho = _check_rho(rho)
        super().__init__(optimizer, num_tasks, **kwargs)

    def _repr_options(self) -> str:
        return f"gamma={self.gamma}, beta={self.beta}, rho={self.rho}, {super()._repr_options()}"

    @property
    def lam(self) -> Tensor:
        """The current simplex weights ``lam`` (float64); a copy."""
        lam = self._state_copy("lam")
        if lam is None:
            k = self._known_num_tasks()
            lam = np.full(k, 1.0 / k)
        return torch.from_numpy(lam)

    # -- state
    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        if (arrays["norms_ma"] < 0).any():
            raise ValueError(
                f"MultiBalanceS state 'norms_ma' must be non-negative, got "
                f"{arrays['norms_ma'].tolist()}"
            )
        try:
            _check_simplex(arrays["lam"], "MultiBalanceS state 'lam'")
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    def _state_for(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(u, lam)`` as float64 host vectors (host arrays: no device read)."""
        saved = self._saved_vectors(k)
        if saved is None:
            return np.zeros(k), np.full(k, 1.0 / k)
        u, lam = saved
        return u, lam

    # -- the method
    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Steps 1-4 of the class docstring on the step's host copy; returns ``(c, extras)``.

        The state is replaced only once ``c`` is known to be finite.
        """
        assert gram is not None  # requires_gram: the engine always passes it
        m = check_gram(gram)
        u, lam = self._state_for(m.shape[0])
        out = _multibalance_s_step_np(u, lam, m, gamma=self.gamma, beta=self.beta, rho=self.rho)
        c = out["coefficients"]
        if not (np.isfinite(c).all() and np.isfinite(out["lam"]).all()):  # state untouched
            raise NonFiniteError(f"MultiBalanceS produced non-finite weights {c.tolist()}")
        self.balancer_state = {"norms_ma": out["norms_ma"].copy(), "lam": out["lam"].copy()}
        extras = {key: np.array(v) for key, v in out.items() if key != "coefficients"}
        return c.copy(), extras
