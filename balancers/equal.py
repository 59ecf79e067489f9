"""Fixed task weights: the plain (weighted) sum, the baseline every method is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import host_array

__all__ = ["EqualWeight"]


class EqualWeight(BalancedOptimizer):
    """Static task weights ``c_k = w_k`` (default all one: the plain summed loss).

    Formula: the shared part receives ``sum_k w_k grad L_k``; the heads receive their own
    unweighted gradient unless ``weight_heads=True``.

    When the weights are all one (or ``weight_heads=True``) the step is one ordinary backward of
    ``sum_k w_k L_k``: no per-task gradient is computed (``BalanceInfo.gram`` is ``None``) unless
    ``compute_gram=True`` asks for it for diagnostics.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K (inferred from ``weights`` or the first call when ``None``).
        weights: K finite, non-negative weights (default ones).
        **kwargs: options of :class:`mtl.BalancedOptimizer`.
    """

    requires_gram = False

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        w: np.ndarray | None = None
        if weights is not None:
            w = host_array(weights).copy()
            if w.ndim != 1 or w.size == 0:
                raise ValueError(
                    f"weights must be a non-empty 1-D sequence, got shape {tuple(w.shape)}"
                )
            if not np.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
            if num_tasks is None:
                num_tasks = w.size
            elif w.size != num_tasks:
                raise ValueError(f"weights has {w.size} entries but num_tasks={num_tasks}")
        super().__init__(optimizer, num_tasks, **kwargs)
        self._fixed = w

    def _repr_options(self) -> str:
        w = None if self._fixed is None else self._fixed.tolist()
        return f"weights={w}, {super()._repr_options()}"

    def _plain_backward_is_exact(self) -> bool:
        return self.weight_heads or self._fixed is None or bool((self._fixed == 1).all())

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``(w or ones, {})`` as a float64 host array (a fresh copy); no device work."""
        if self._fixed is None:
            return np.ones(np.shape(losses)[0]), {}
        return self._fixed.copy(), {}
