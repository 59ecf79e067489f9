"""GLS: geometric loss strategy (Chennupati et al., CVPR Workshops 2019), a loss-level method.

Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning" (CVPRW 2019): minimise the geometric mean of the
task losses, ``GLS = (prod_k L_k)^{1/K}``. Its gradient is a weighted sum of the task gradients::

    grad GLS = sum_k c_k grad L_k,     c_k = (1/K) GLS / L_k

so the step is ONE backward of ``sum_k c_k L_k`` with ``c`` computed on the host from the losses
(in log space: ``log c_k = mean_j log L_j - log L_k - log K``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._learned import loss_level_kwargs
from ._options import check_positive

__all__ = ["GLS", "gls_weights"]


def gls_weights(
    losses: Any, eps: float = 0.0, name: Callable[[int], str] | None = None
) -> tuple[np.ndarray, float]:
    """``(c, GLS)``: ``c_k = (1/K) GLS / (L_k + eps)``, ``GLS = (prod_k (L_k + eps))^{1/K}``.

    Computed in log space (no overflow of the product for many tasks or large losses).

    Raises:
        ValueError: a shifted loss ``L_k + eps`` is not positive (the geometric mean and its
            gradient are then undefined); the message names the task(s) (``name(k)``).
    """
    x = np.asarray(losses, dtype=np.float64) + check_positive("eps", eps, allow_zero=True)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"losses must be a non-empty (K,) vector, got shape {x.shape}")
    bad = [k for k in range(x.shape[0]) if not x[k] > 0]
    if bad:
        label = name or (lambda k: f"task {k}")
        names = ", ".join(f"{label(k)} (loss {float(x[k]) - eps!r})" for k in bad)
        raise ValueError(
            f"GLS needs positive losses (it minimises their geometric mean), got {names}"
            + ("" if eps else "; pass eps > 0 to shift the losses")
        )
    logs = np.log(x)
    mean = float(logs.mean())
    c: np.ndarray = np.exp(mean - logs - math.log(x.shape[0]))
    return c, math.exp(mean)


class GLS(BalancedOptimizer):
    """Geometric loss strategy (Chennupati et al., CVPRW 2019): minimise ``(prod_k L_k)^{1/K}``.

    Per balanced step::

        GLS = (prod_k (L_k + eps))^{1/K},    c_k = (1/K) GLS / (L_k + eps)
        model: ONE backward of sum_k c_k L_k  (= grad GLS exactly; heads included)

    Relation to the paper: the paper (and LibMTL) back-propagates the geometric mean itself; the
    coefficients above are its exact chain rule, so the model's gradient is the same. No state.

    Non-positive losses: the geometric mean of losses that are not all positive has no
    gradient (``L_k = 0`` gives ``0 * inf``). Such a loss raises ``ValueError`` naming the task,
    before any gradient is written: a loss at or below zero is a property of the loss function
    (e.g. a log-likelihood that can be negative), not a transient numerical accident, so it is
    not routed through ``on_nonfinite`` (NaN/inf losses still are). ``eps > 0`` shifts every
    loss (``L_k + eps``) for losses bounded below by ``-eps``.

    Args:
        optimizer: the inner optimizer over all model parameters.
        num_tasks: K (inferred from the first call when ``None``).
        eps: shift added to every loss (default 0, the paper's objective).
        **kwargs: options of :class:`mtl.BalancedOptimizer`; ``weight_heads`` is always ``True``.

    ``BalanceInfo.extras``: ``geometric_mean`` (``GLS`` of this step's losses).
    """

    requires_gram = False
    uses_gradients = False

    def __init__(
        self, optimizer: Optimizer, num_tasks: int | None = None, *, eps: float = 0.0, **kwargs: Any
    ) -> None:
        eps = check_positive("eps", eps, allow_zero=True)
        super().__init__(optimizer, num_tasks, **loss_level_kwargs(kwargs, "GLS"))
        self.eps = eps

    def _repr_options(self) -> str:
        return f"eps={self.eps}, {super()._repr_options()}"

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`gls_weights` of the host losses."""
        c, value = gls_weights(losses, self.eps, self._name)
        return c, {"geometric_mean": value}
