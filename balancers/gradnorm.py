"""GradNorm (Chen, Badrinarayanan, Lee, Rabinovich; ICML 2018): learnable task weights that
equalise the weighted gradient norms, each pulled toward a target set by its training rate.

The math is one pure host function (:func:`_gradnorm_step_np`, public wrapper
:func:`gradnorm_step`) of the gradient norms (the square roots of the Gram diagonal), the losses
and the state; :class:`GradNorm` is the optimizer wrapper. See ``docs/methods.md`` (GradNorm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import NonFiniteError

from ._host import check_gram, device_of, host_array, to_torch
from ._learned import HostVectorBalancer, finite_vector
from ._options import check_positive

__all__ = ["GradNorm", "gradnorm_step"]

#: relative tolerance of ``sum(weights) = K`` when a state is loaded
_SUM_RTOL = 1e-6


# ---------------------------------------------------------------------- option checks
def _check_lr(lr: Any) -> float:
    return check_positive("lr", lr, allow_zero=True)


def _check_alpha(alpha: Any) -> float:
    return check_positive("alpha", alpha, allow_zero=True)


def _check_min_weight(min_weight: Any) -> float:
    v = check_positive("min_weight", min_weight)
    if v > 1.0:
        raise ValueError(f"min_weight must be in (0, 1], got {min_weight!r}")
    return v


def _check_initial_losses(initial_losses: Any) -> np.ndarray | None:
    if initial_losses is None:
        return None
    try:
        a = np.array(host_array(initial_losses), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"initial_losses must be K positive finite numbers, got {initial_losses!r}"
        ) from None
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all() or (a <= 0).any():
        raise ValueError(
            f"initial_losses must be K positive finite numbers, got {np.asarray(a).tolist()}"
        )
    return a


# ---------------------------------------------------------------------- pure functions
def _loss_ratios(losses: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``, overflow-free (computed in logs).

    A task with ``L_k(0) = 0`` (not recorded yet) has ``L~_k = 1``; a loss ``<= 0`` gives
    ``L~_k = 0``; when every ``L~_k`` is 0 the ratios are all one.
    """
    recorded = initial > 0
    with np.errstate(divide="ignore"):
        log_t = np.where(
            recorded,
            np.log(np.maximum(losses, 0.0)) - np.log(np.where(recorded, initial, 1.0)),
            0.0,
        )
    top = log_t.max()
    if not math.isfinite(float(top)):  # every L~_k is 0
        return np.ones_like(losses)
    t = np.exp(log_t - top)  # L~ / max L~, in (0, 1], max exactly 1
    ratios: np.ndarray = t / t.mean()
    return ratios


def _gradnorm_step_np(
    weights: np.ndarray,
    norms: np.ndarray,
    losses: np.ndarray,
    initial_losses: np.ndarray,
    *,
    lr: float,
    alpha: float,
    min_weight: float,
) -> dict[str, np.ndarray]:
    """One GradNorm update on validated float64 host vectors (see :class:`GradNorm`).

    Returns a dict: ``initial_losses`` (with this step's records), ``loss_ratios`` (``r``),
    ``gradnorms`` (``G``), ``targets``, ``grad_loss`` (``L_grad``, a 0-d array),
    ``weight_grad`` (``dL_grad/dw``) and ``next_weights`` (``w(t+1)``, renormalised).
    """
    k = weights.shape[0]
    # L_k(0): recorded at the first step where the loss is positive
    initial = np.where((initial_losses <= 0) & (losses > 0), losses, initial_losses)
    r = _loss_ratios(losses, initial)
    g = weights * norms
    targets = g.mean() * r**alpha  # held constant: no derivative through mean(G) or r
    diff = g - targets
    grad = np.sign(diff) * norms
    new = np.maximum(weights - lr * grad, min_weight)
    new = k * new / new.sum()
    return {
        "initial_losses": initial,
        "loss_ratios": r,
        "gradnorms": g,
        "targets": targets,
        "grad_loss": np.array(np.abs(diff).sum()),
        "weight_grad": grad,
        "next_weights": new,
    }


def gradnorm_step(
    weights: Tensor | np.ndarray | Sequence[float],
    gram: Tensor | np.ndarray,
    losses: Tensor | np.ndarray | Sequence[float],
    initial_losses: Tensor | np.ndarray | Sequence[float],
    *,
    lr: float = 0.025,
    alpha: float = 1.5,
    min_weight: float = 1e-6,
) -> Tensor:
    """GradNorm's weights for the next step, ``w(t+1)``, from ``w(t)`` (pure function).

    ``||g_k|| = sqrt(M_kk)``, ``G_k = w_k ||g_k||``, ``r_k = L~_k / mean_j L~_j`` with
    ``L~_k = L_k / L_k(0)``, target ``T_k = mean(G) r_k^alpha`` (a constant), then
    ``w_k <- max(w_k - lr sign(G_k - T_k) ||g_k||, min_weight)`` and ``w <- K w / sum(w)``.
    An ``initial_losses`` entry of 0 means "not recorded yet": the current loss is used when
    positive, else ``L~_k = 1``.

    Args:
        weights: ``(K,)`` current positive weights ``w(t)``.
        gram: ``(K, K)`` Gram matrix of the task gradients (any device, or a NumPy array).
        losses: ``(K,)`` finite task losses ``L_k(t)``.
        initial_losses: ``(K,)`` non-negative ``L_k(0)`` (0 = not recorded).
        lr, alpha, min_weight: as in :class:`GradNorm`.

    Returns:
        float64 ``w(t+1)`` on ``gram``'s device (CPU for NumPy input).
    """
    lr_, alpha_, floor = _check_lr(lr), _check_alpha(alpha), _check_min_weight(min_weight)
    m = check_gram(host_array(gram))
    k = m.shape[0]
    w = finite_vector(weights, "weights", k)
    if (w <= 0).any():
        raise ValueError(f"weights must be positive, got {w.tolist()}")
    loss = finite_vector(losses, "losses", k)
    initial = finite_vector(initial_losses, "initial_losses", k)
    if (initial < 0).any():
        raise ValueError(f"initial_losses must be non-negative, got {initial.tolist()}")
    norms = np.sqrt(np.clip(np.diagonal(m), 0.0, None))
    out = _gradnorm_step_np(w, norms, loss, initial, lr=lr_, alpha=alpha_, min_weight=floor)
    return to_torch(out["next_weights"], device_of(gram))


# ---------------------------------------------------------------------- the optimizer
class GradNorm(HostVectorBalancer):
    """GradNorm: learnable task weights that balance the weighted gradient norms.

    Per step ``t``, with ``M`` the Gram matrix of the task gradients at the balance point
    (representation level: ``h_k``; parameter level: ``g_k`` over all shared parameters):

    1. ``||g_k|| = sqrt(M_kk)``; ``G_k = w_k ||g_k||``; ``G_bar = mean_k G_k``;
    2. ``L_k(0)`` is recorded at the first step (per task: the first step where ``L_k > 0``;
       or given by ``initial_losses``); ``L~_k = L_k / L_k(0)``, ``r_k = L~_k / mean_j L~_j``;
    3. ``L_grad = sum_k |G_k - G_bar r_k^alpha|`` with the targets ``G_bar r_k^alpha`` held
       constant, so ``dL_grad/dw_k = sign(G_k - G_bar r_k^alpha) ||g_k||``;
    4. the shared part receives ``sum_k w_k(t) g_k`` (the weights BEFORE this step's update:
       the paper's Algorithm 1 scales ``L(t) = sum_i w_i(t) L_i(t)``, updates ``w`` afterwards
       and renormalises ``w(t+1)``; LibMTL likewise applies the pre-update weights); heads get
       their own unweighted gradient (``weight_heads=True``: ``w_k(t) grad L_k``);
    5. ``w(t+1) = K w' / sum(w')`` with ``w'_k = max(w_k(t) - lr dL_grad/dw_k, min_weight)``.

    Weights start at 1 (``sum w = K``). A task whose gradient is exactly zero has
    ``dL_grad/dw_k = 0``: its weight moves only through the renormalisation (never NaN).

    Relation to the paper (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1) [P], and to LibMTL's
    ``LibMTL/weighting/GradNorm.py`` [C]: the paper measures ``G_k`` on a chosen subset of
    shared weights (usually the last shared layer), back-propagates ``L_grad`` through those
    gradient norms (second-order autograd) and applies ``grad_w L_grad`` with the standard update
    rules used for the network; LibMTL parametrises ``w = K softmax(s)`` and takes ``L_k(0)`` as
    the mean loss of the first epoch (trained unweighted). Here the norms come from the Gram
    diagonal at the balance point (the step's one host copy), ``w`` takes its own plain gradient
    step of size ``lr`` on the host (no autograd, no inner-optimizer state), and ``L_k(0)`` is
    the first step's loss. Our choices, not the paper's: ``min_weight`` (a positivity floor
    before the renormalisation; the paper does not say how a step that would make a weight
    non-positive is handled), ``L~_k = max(L_k, 0) / L_k(0)`` (GradNorm assumes positive
    losses), ``L~_k = 1`` while ``L_k(0)`` is unrecorded, and ``r = 1`` when every ``L~_k`` is 0.
    The plain step ``lr ||g_k||`` scales with the gradient norm (an adaptive optimizer such as
    Adam would not): choose ``lr`` for the norms at your balance point.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        lr: step size of the weight update (default 0.025, the value of
            ``reference/baselines.md``); 0 freezes ``w`` at 1 (the plain sum).
        alpha: the restoring-force exponent (default 1.5), ``>= 0``.
        initial_losses: K positive ``L_k(0)`` to use instead of the first step's losses (e.g.
            ``log C`` for a C-class cross-entropy at initialisation); default ``None``.
        min_weight: floor of a weight before the renormalisation, in ``(0, 1]`` (default 1e-6).
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.weights``: ``w(t)`` (the weights applied). ``BalanceInfo.extras``:
    ``norms`` (``||g_k||``), ``gradnorms`` (``G``), ``loss_ratios`` (``r``), ``targets``,
    ``grad_loss`` (``L_grad``), ``weight_grad`` (``dL_grad/dw``), ``next_weights``
    (``w(t+1)``).

    State (``balancer_state``; empty before the first step): ``weights`` ``(K,)`` (``w(t+1)``,
    positive, summing to K) and ``initial_losses`` ``(K,)`` (0 = not recorded yet), float64
    NumPy arrays on the host (read without any device access); ``state_dict()`` saves them as
    CPU float64 tensors. ``reset_state()``: back to ``w = 1`` and unrecorded ``L(0)``
    (``initial_losses`` is kept).
    """

    requires_gram = True
    per_block = False
    _STATE_KEYS = ("weights", "initial_losses")

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        lr: float = 0.025,
        alpha: float = 1.5,
        initial_losses: Sequence[float] | Tensor | np.ndarray | None = None,
        min_weight: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        self.lr = _check_lr(lr)
        self.alpha = _check_alpha(alpha)
        self.min_weight = _check_min_weight(min_weight)
        self.initial_losses = _check_initial_losses(initial_losses)
        if self.initial_losses is not None:
            if num_tasks is None:
                num_tasks = self.initial_losses.size
            elif self.initial_losses.size != num_tasks:
                raise ValueError(
                    f"initial_losses has {self.initial_losses.size} entries but "
                    f"num_tasks={num_tasks}"
                )
        super().__init__(optimizer, num_tasks, **kwargs)

    def _repr_options(self) -> str:
        l0 = None if self.initial_losses is None else self.initial_losses.tolist()
        return (
            f"lr={self.lr}, alpha={self.alpha}, initial_losses={l0}, "
            f"min_weight={self.min_weight}, {super()._repr_options()}"
        )

    @property
    def weights(self) -> Tensor:
        """The weights the next step applies, ``w(t+1)`` (float64, sum K); a copy."""
        w = self._state_copy("weights")
        return torch.from_numpy(np.ones(self._known_num_tasks()) if w is None else w)

    # -- state
    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        w = arrays["weights"]
        if (w <= 0).any() or abs(w.sum() - w.size) > _SUM_RTOL * w.size:
            raise ValueError(
                f"GradNorm state 'weights' must be positive and sum to K={w.size}, got {w.tolist()}"
            )
        if (arrays["initial_losses"] < 0).any():
            raise ValueError(
                "GradNorm state 'initial_losses' must be non-negative (0 = not recorded), got "
                f"{arrays['initial_losses'].tolist()}"
            )

    def _state_for(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(w(t), L(0))`` as float64 host vectors (host arrays: no device read)."""
        saved = self._saved_vectors(k)
        if saved is not None:
            w, initial = saved
            return w, initial
        initial = np.zeros(k) if self.initial_losses is None else self.initial_losses.copy()
        if initial.size != k:
            raise ValueError(f"initial_losses has {initial.size} entries but this step has {k}")
        return np.ones(k), initial

    # -- the method
    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Steps 1-5 of the class docstring on the step's host copy; returns ``(w(t), extras)``.

        The state is replaced only once ``w(t+1)`` is known to be finite.
        """
        assert gram is not None  # requires_gram: the engine always passes it
        m = check_gram(gram)
        k = m.shape[0]
        w, initial = self._state_for(k)
        norms = np.sqrt(np.clip(np.diagonal(m), 0.0, None))
        out = _gradnorm_step_np(
            w,
            norms,
            np.asarray(losses, dtype=np.float64),
            initial,
            lr=self.lr,
            alpha=self.alpha,
            min_weight=self.min_weight,
        )
        new = out["next_weights"]
        if not np.isfinite(new).all():  # state untouched
            raise NonFiniteError(f"GradNorm produced non-finite weights {new.tolist()}")
        self.balancer_state = {
            "weights": new.copy(),
            "initial_losses": out["initial_losses"].copy(),
        }
        extras = {key: np.array(v) for key, v in out.items() if key != "initial_losses"}
        extras["norms"] = norms
        return w.copy(), extras
