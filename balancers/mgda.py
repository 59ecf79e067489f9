"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm point of the task gradients."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, device_of, host_array, to_torch
from ._min_norm import _min_norm_weights_np
from ._options import check_choice

__all__ = ["MGDA", "MGDACollapseWarning", "mgda_weights", "collapsed_tasks"]

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _scales_np(normalization: str, gram: np.ndarray, losses: np.ndarray, eps: float) -> np.ndarray:
    """Scales ``s_k`` of the normalisation (host float64); 1 where ``s_k <= eps``."""
    if normalization == "none":
        return np.ones(losses.shape[0])
    if normalization in ("loss", "loss+") and (losses < 0).any():
        raise ValueError(
            f"normalization={normalization!r} needs non-negative losses, got {losses.tolist()}"
        )
    norms = np.sqrt(np.clip(np.diagonal(gram), 0.0, None))
    if normalization == "l2":
        s = norms
    elif normalization == "loss":
        s = losses.copy()
    else:
        s = losses * norms
    # a zero gradient (or zero loss) stays zero after normalisation instead of dividing by zero
    return np.where(s > eps, s, 1.0)


class MGDACollapseWarning(UserWarning):
    """MGDA has given a task (almost) no weight for many steps while the task still has a
    gradient: the min-norm point ignores the task with the largest gradient."""


def collapsed_tasks(
    c: np.ndarray, gram: np.ndarray, losses: np.ndarray, *, tol: float = 1e-3, gap: float = 10.0
) -> np.ndarray:
    """Mask of the tasks MGDA leaves (almost) untrained at this step.

    With the update ``d = sum_j c_j g_j`` (``|d|^2 = c^T M c``), task ``k`` is *collapsed* when
    ``c_k <= tol * max_j c_j``, its gradient is much larger than the update
    (``|g_k| >= gap * |d| > 0``) and its loss is not zero. MGDA still guarantees
    ``g_k . d >= |d|^2``, but the task then moves at a rate ``|d| / |g_k|`` of its own gradient:
    with losses of different scales (a raw-unit regression next to a click-through BCE) the
    largest-scale task is trained through the shared part at a thousandth of its pace. A task
    whose gradient is small (converged) or close to the update is never flagged.
    """
    norms = np.sqrt(np.clip(np.diagonal(gram), 0.0, None))
    d = float(np.sqrt(max(float(c @ gram @ c), 0.0)))
    small = c <= tol * max(float(np.max(c)), 0.0)
    return np.asarray(small & (d > 0) & (norms >= gap * d) & (losses != 0), dtype=bool)


def _mgda_weights_np(
    gram: np.ndarray,
    losses: np.ndarray | None,
    *,
    normalization: str = "none",
    normalized_update: bool = False,
    eps: float = 1e-12,
    max_iter: int | None = None,
    tol: float = 1e-14,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`mgda_weights` on host float64 arrays; returns ``(c, alpha, scales)``."""
    check_choice("normalization", normalization, _NORMALIZATIONS)
    k = gram.shape[0]
    if losses is None:
        if normalization in ("loss", "loss+"):
            raise ValueError(f"normalization={normalization!r} needs the losses")
        losses = np.ones(k)
    s = _scales_np(normalization, gram, losses, eps)
    alpha = _min_norm_weights_np(check_gram(gram / np.outer(s, s)), max_iter=max_iter, tol=tol)
    return (alpha / s if normalized_update else alpha), alpha, s


def mgda_weights(
    gram: Tensor | np.ndarray,
    losses: Tensor | np.ndarray | None = None,
    *,
    normalization: Normalization = "none",
    normalized_update: bool = False,
    eps: float = 1e-12,
    max_iter: int | None = None,
    tol: float = 1e-14,
) -> tuple[Tensor, Tensor]:
    """MGDA coefficients from a Gram matrix: a pure function, usable without a model.

    With scales ``s_k`` (``none``: 1; ``l2``: ``|g_k|``; ``loss``: ``L_k``; ``loss+``:
    ``L_k |g_k|``), solve ``alpha = argmin_{alpha in simplex} |sum_k alpha_k g_k / s_k|^2`` on the
    scaled Gram ``M_ij / (s_i s_j)``. The update uses ``c_k = alpha_k`` (the reference code's
    semantics: normalisation only changes alpha) or, with ``normalized_update=True``,
    ``c_k = alpha_k / s_k`` (LibMTL's: the normalised gradients enter the update).

    Accepts tensors (any device) or NumPy arrays; the solve runs on the host
    (:func:`_mgda_weights_np`).

    Returns:
        ``(c, alpha)``: the coefficients to apply and the simplex weights, float64 ``(K,)``
        tensors on ``gram``'s device (CPU for NumPy input).
    """
    check_choice("normalization", normalization, _NORMALIZATIONS)
    device = device_of(gram)
    c, alpha, _ = _mgda_weights_np(
        host_array(gram),
        None if losses is None else host_array(losses),
        normalization=normalization,
        normalized_update=normalized_update,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
    )
    return to_torch(c, device), to_torch(alpha, device)


class MGDA(BalancedOptimizer):
    """Multiple-gradient descent: the min-norm convex combination of the task gradients.

    Formula: ``alpha = argmin_{alpha in simplex} |sum_k alpha_k g_k|^2`` (Sener & Koltun 2018,
    Eq. 3), solved exactly from the Gram matrix (closed form for two tasks, Wolfe's
    min-norm-point algorithm otherwise; see :func:`balancers.min_norm_weights`). The shared part
    receives ``sum_k alpha_k g_k``; it either vanishes (Pareto-stationary point) or decreases
    every task to first order. With ``representation=`` the gradients are taken with respect to
    the representation batch ``Z``, which is MGDA-UB (Sec. 3.3 of the paper); with
    ``shared_parameters=`` it is exact MGDA.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``: gradient
            normalisation before the solve (reference code, Sec. 6.5 of methods.md).
        normalized_update: apply ``alpha_k / s_k`` instead of ``alpha_k`` (default ``False``).
        max_iter, tol: solver options (see :func:`balancers.min_norm_weights`).
        collapse_steps: warn (:class:`MGDACollapseWarning`, once per task) when a task has been
            *collapsed* (:func:`collapsed_tasks`: ``c_k ~ 0`` while its gradient is 10x larger
            than the update and its loss is not zero) for this many consecutive steps (default 20; ``None``
            never warns). This is MGDA's documented behaviour under mismatched loss scales,
            not an error: the message points to ``normalization="l2",
            normalized_update=True``.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.extras``: ``alpha`` (simplex weights), ``scales`` and ``collapsed`` (the mask
    of :func:`collapsed_tasks` at this step). The consecutive-step counters behind the warning
    are a diagnostic, not part of the checkpointed state.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        normalization: Normalization = "none",
        normalized_update: bool = False,
        max_iter: int | None = None,
        tol: float = 1e-14,
        collapse_steps: int | None = 20,
        **kwargs: Any,
    ) -> None:
        check_choice("normalization", normalization, _NORMALIZATIONS)
        bad_steps = isinstance(collapse_steps, bool) or (
            collapse_steps is not None
            and (int(collapse_steps) != collapse_steps or collapse_steps < 1)
        )
        if bad_steps:
            raise ValueError(
                f"collapse_steps must be a positive int or None, got {collapse_steps!r}"
            )
        super().__init__(optimizer, num_tasks, **kwargs)
        self.normalization = normalization
        self.normalized_update = bool(normalized_update)
        self.max_iter = max_iter
        self.tol = tol
        self.collapse_steps = None if collapse_steps is None else int(collapse_steps)
        self._collapse_run: np.ndarray | None = None
        self._collapse_warned: set[int] = set()

    def _repr_options(self) -> str:
        return (
            f"normalization={self.normalization!r}, normalized_update={self.normalized_update}, "
            f"{super()._repr_options()}"
        )

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`_mgda_weights_np` on the host copy of the Gram matrix and the losses.

        Returns ``(c, {"alpha": alpha, "scales": s, "collapsed": mask})``.
        """
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        c, alpha, scales = _mgda_weights_np(
            gram,
            losses,
            normalization=self.normalization,
            normalized_update=self.normalized_update,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        collapsed = collapsed_tasks(c, gram, losses)
        self._watch_collapse(collapsed, losses)
        return c, {"alpha": alpha, "scales": scales, "collapsed": collapsed}

    def _watch_collapse(self, collapsed: np.ndarray, losses: np.ndarray) -> None:
        """Count consecutive collapsed steps per task; warn once per task at ``collapse_steps``."""
        if self.collapse_steps is None:
            return
        run = getattr(self, "_collapse_run", None)  # absent in an optimizer pickled before it
        if run is None or run.shape != collapsed.shape:
            run = np.zeros(collapsed.shape, dtype=np.int64)
        run = np.where(collapsed, run + 1, 0)
        self._collapse_run = run
        warned: set[int] = getattr(self, "_collapse_warned", set())
        self._collapse_warned = warned
        for k in np.flatnonzero(run >= self.collapse_steps).tolist():
            if k in warned:
                continue
            warned.add(k)
            warnings.warn(
                f"MGDA has given {self._name(k)} ~zero weight for {int(run[k])} consecutive "
                f"steps while its loss is {float(losses[k]):.4g} and its gradient is over 10x "
                "the update: the min-norm point ignores the task with the largest gradient, "
                "which happens when the losses have different scales (a raw-unit regression "
                "next to a BCE). This is MGDA's documented behaviour; to balance the scales "
                "pass normalization='l2', normalized_update=True (the normalised gradients "
                f"enter the update; now normalization={self.normalization!r}, "
                f"normalized_update={self.normalized_update}), or use Nash-MTL, IMTL-G or "
                "CAGrad (docs/choosing.md). normalization='l2' alone only changes alpha and "
                "leaves the scales unbalanced.",
                MGDACollapseWarning,
                stacklevel=2,
            )
