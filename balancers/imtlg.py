"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the combination of
the task gradients whose projections onto every unit task gradient are equal.

The weighting is a pure function of the Gram matrix :func:`imtlg_weights`; the class
:class:`IMTLG` applies it at either level (representation or shared parameters).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, device_of, host_array, to_torch
from .upgrad import _cosines

__all__ = ["IMTLG", "imtlg_weights"]

_EPS = float(np.finfo(np.float64).eps)
#: ``|sum_k v_k|`` at or below this fraction of ``sum_k |v_k|`` counts as a vanishing sum
_SUM_RTOL = 1e-12


def _imtlg_weights_np(gram: np.ndarray) -> tuple[np.ndarray, float, int]:
    """:func:`imtlg_weights` on a host Gram matrix; returns ``(alpha, t, rank)``.

    ``t`` is the common projection ``u_k . d`` of the combined direction on every unit task
    gradient, in units of the input (``nan`` when the weights are all zero), ``rank`` the rank
    of the cosine matrix used by the pseudo-inverse.
    """
    m = check_gram(gram)
    k = m.shape[0]
    alpha = np.zeros(k)
    c, scaled_norms, active = _cosines(m)
    if not active.any():  # every gradient is zero: d = 0 whatever the weights
        return alpha, float("nan"), 0
    norms = scaled_norms[active]  # |g_k| times one power of two: alpha does not depend on it
    # beta = C^+ 1 by an eigendecomposition; eigenvalues below K eps lambda_max are dropped
    lam, vec = np.linalg.eigh(c)
    keep = lam > lam.max() * c.shape[0] * _EPS
    beta = vec[:, keep] @ ((vec[:, keep].T @ np.ones(c.shape[0])) / lam[keep])
    v = beta / norms  # = M_active^+ |g| up to the choice of generalized inverse (see docstring)
    s = float(v.sum())
    if abs(s) <= _SUM_RTOL * float(np.abs(v).sum()):
        return alpha, float("nan"), int(keep.sum())
    alpha[active] = v / s
    j = int(np.argmax(np.diagonal(m)))  # the common projection, in the input's units
    return alpha, float(m[j] @ alpha) / float(np.sqrt(m[j, j])), int(keep.sum())


def imtlg_weights(gram: Tensor | np.ndarray) -> Tensor:
    """IMTL-G coefficients ``alpha`` from a Gram matrix: a pure function, usable without a model.

    ``alpha = M^+ |g| / (1^T M^+ |g|)`` (``|g|_k = sqrt(M_kk)``), computed on the cosine matrix;
    see :class:`IMTLG`.

    Returns:
        ``(K,)`` float64 weights summing to 1 (all zero in the degenerate cases of
        :class:`IMTLG`) on ``gram``'s device (CPU for NumPy input).
    """
    alpha, _, _ = _imtlg_weights_np(host_array(gram))
    return to_torch(alpha, device_of(gram))


class IMTLG(BalancedOptimizer):
    """Impartial multi-task learning, gradient part (IMTL-G): equal projections on every task.

    Formula (Liu et al. 2021, Sec. 3.2, Eq. 7): with ``u_k = g_k / |g_k|``,
    ``D = [g_1 - g_k]_{k>=2}`` and ``U = [u_1 - u_k]_{k>=2}``::

        alpha_{2:K} = g_1 U^T (D U^T)^-1,    alpha_1 = 1 - sum_{k>=2} alpha_k,
        d = sum_k alpha_k g_k

    so that ``u_k . d`` is the same for every task and ``sum_k alpha_k = 1``. In terms of the
    Gram matrix the two conditions read ``M alpha = t |g|`` (``|g|_k = sqrt(M_kk)``) and
    ``1^T alpha = 1``, hence the closed form implemented here::

        alpha = M^-1 |g| / (1^T M^-1 |g|)

    (identical to the paper's when ``D U^T`` is invertible, and TorchJD's ``IMTLG``). It is
    computed on the cosine matrix ``C = D^-1/2 M D^-1/2`` as ``v = (C^+ 1) / |g|``,
    ``alpha = v / sum(v)``, which is indifferent to gradient norms spanning many orders of
    magnitude.

    Degenerate cases (choices, not in the paper):

    * zero gradients (``M_kk = 0``): ``u_k`` is undefined; those tasks get ``alpha_k = 0`` and
      the others are balanced among themselves (TorchJD's pseudo-inverse does the same). All
      zero: all weights 0.
    * singular ``C`` (duplicate or linearly dependent gradients, ``D U^T`` singular): the
      pseudo-inverse ``C^+`` (eigenvalues below ``K eps lambda_max`` dropped), i.e. the
      least-squares solution of smallest contribution norm ``sum_k (alpha_k |g_k|)^2``. The
      direction is then still the equal-projection one when such a direction exists in the span
      of the gradients; its length (fixed by ``sum alpha = 1``) depends on the choice of
      generalised inverse, and TorchJD's ``pinv(M)`` may choose differently (e.g. for parallel
      gradients of different norms).
    * ``sum_k v_k`` vanishing (``|sum v| <= 1e-12 sum |v|``: the equal-projection direction is
      at infinity): all weights 0, as TorchJD (which uses an absolute ``1e-12``).
    * as in the paper, nothing forces the common projection ``t`` to be positive: when
      ``sum_k v_k < 0`` the direction has the same *negative* projection on every task.
      ``BalanceInfo.extras["projection"]`` reports ``t``.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    State: none. Cost per step on the host: one K x K symmetric eigendecomposition.

    ``BalanceInfo.extras``: ``projection`` (the common ``u_k . d``), ``rank`` (of ``C``).
    """

    def __init__(self, optimizer: Optimizer, num_tasks: int | None = None, **kwargs: Any) -> None:
        super().__init__(optimizer, num_tasks, **kwargs)

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`_imtlg_weights_np` on the step's host Gram matrix."""
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        alpha, t, rank = _imtlg_weights_np(gram)
        return alpha, {"projection": np.float64(t), "rank": rank}
