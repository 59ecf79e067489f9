"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023): make the task gradients' principal components equally scaled and aligned.

The weighting is a pure function of the Gram matrix :func:`alignedmtl_weights`; the class
:class:`AlignedMTL` applies it at either level (representation or shared parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, device_of, host_array, to_torch
from ._options import check_choice, check_positive
from .upgrad import _pref_vector_np, _unit_scale

__all__ = ["AlignedMTL", "alignedmtl_weights"]

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")
_EPS = float(np.finfo(np.float64).eps)


def _alignedmtl_weights_np(
    gram: np.ndarray,
    pref_vector: np.ndarray | None = None,
    scale_mode: str = "min",
    rank_rtol: float | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`alignedmtl_weights` on a host Gram matrix; returns ``(c, eigenvalues, rank)``
    (the eigenvalues of ``M`` in descending order)."""
    check_choice("scale_mode", scale_mode, _SCALE_MODES)
    m = check_gram(gram)
    k = m.shape[0]
    w = np.full(k, 1.0 / k) if pref_vector is None else pref_vector
    if w.size != k:
        raise ValueError(f"pref_vector has {w.size} entries but the Gram matrix is {k} x {k}")
    q = _unit_scale(m)  # B is invariant to the scale of M; this keeps the eigensolver in range
    lam, vec = np.linalg.eigh(q)
    order = np.argsort(lam)[::-1]
    lam, vec = lam[order], vec[:, order]
    ratio = k * _EPS if rank_rtol is None else rank_rtol
    rank = int((lam > lam[0] * ratio).sum()) if lam[0] > 0.0 else 0
    top = float(np.max(np.diagonal(q)))
    factor = float(np.max(np.diagonal(m))) / top if top > 0.0 else 1.0  # a power of two
    eigenvalues = np.clip(lam, 0.0, None) * factor
    if rank == 0:  # every gradient is zero: B = I (TorchJD)
        return w.copy(), eigenvalues, 0
    lam_r, v_r = lam[:rank], vec[:, :rank]
    if scale_mode == "min":
        scale = lam_r[-1]
    elif scale_mode == "median":
        scale = np.sort(lam_r)[(rank - 1) // 2]  # the lower median, as torch.median
    else:
        scale = lam_r.mean()
    # B w = sqrt(scale) V Lambda^-1/2 V^T w
    c: np.ndarray = v_r @ (np.sqrt(scale / lam_r) * (v_r.T @ w))
    return c, eigenvalues, rank


def alignedmtl_weights(
    gram: Tensor | np.ndarray,
    *,
    pref_vector: Sequence[float] | Tensor | np.ndarray | None = None,
    scale_mode: ScaleMode = "min",
    rank_rtol: float | None = None,
) -> Tensor:
    """Aligned-MTL coefficients ``c = B w`` from a Gram matrix: a pure function, usable without
    a model. See :class:`AlignedMTL`.

    Returns:
        ``(K,)`` float64 coefficients on ``gram``'s device (CPU for NumPy input).
    """
    check_choice("scale_mode", scale_mode, _SCALE_MODES)
    rtol = None if rank_rtol is None else check_positive("rank_rtol", rank_rtol, allow_zero=True)
    c, _, _ = _alignedmtl_weights_np(
        host_array(gram), _pref_vector_np(pref_vector, None), scale_mode, rtol
    )
    return to_torch(c, device_of(gram))


class AlignedMTL(BalancedOptimizer):
    """Aligned-MTL: combine the task gradients after aligning their principal components.

    Formula (Senushkin et al. 2023, Algorithm 1; TorchJD's ``AlignedMTL``): with the
    eigendecomposition of the Gram matrix on its range, ``M = V Lambda V^T`` (``Lambda`` the
    ``r`` eigenvalues above ``rank_rtol * lambda_max``, ``V`` their eigenvectors)::

        B = sqrt(lambda_s) V Lambda^-1/2 V^T,     c = B w,     d = sum_k c_k g_k

    with ``lambda_s`` the smallest kept eigenvalue (``scale_mode="min"``, the paper) and ``w``
    the task priorities (``1/K`` each by default). ``G^T B`` has orthogonal rows of equal norm
    ``sqrt(lambda_s)`` on the span of the gradients (the "aligned" system: condition number 1),
    so ``d`` is their ``w``-weighted sum. ``B`` is a spectral function of ``M``, so the result
    does not depend on the choice of eigenvectors for repeated eigenvalues, and it is invariant
    to a global rescaling of the gradients.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        pref_vector: non-negative task priorities ``w`` (default ``1/K`` each).
        scale_mode: ``"min"`` (default; the paper): ``lambda_s = lambda_min``; ``"median"``: the
            lower median kept eigenvalue (as ``torch.median``); ``"rmse"``: their mean (the
            original code's option). Same choices as TorchJD.
        rank_rtol: eigenvalues at or below ``rank_rtol * lambda_max`` are treated as zero
            (outside the range). ``None`` (default): ``K * eps(float64)``, as TorchJD; the
            original code used the float32 epsilon. A Gram matrix computed from float32
            gradients is only accurate to ~1e-7 relative, so eigenvalues below that are noise that
            sets the scale of the update when ``scale_mode="min"``; raise ``rank_rtol`` (e.g.
            ``1e-6``) to drop them.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    All-zero gradients: ``B = I`` (``c = w``), as TorchJD.

    State: none. Cost per step on the host: one K x K symmetric eigendecomposition.

    ``BalanceInfo.extras``: ``eigenvalues`` (of ``M``, descending) and ``rank``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        pref_vector: Sequence[float] | Tensor | np.ndarray | None = None,
        scale_mode: ScaleMode = "min",
        rank_rtol: float | None = None,
        **kwargs: Any,
    ) -> None:
        p = _pref_vector_np(pref_vector, num_tasks)
        if p is not None and num_tasks is None:
            num_tasks = p.size
        self.scale_mode = check_choice("scale_mode", scale_mode, _SCALE_MODES)
        self.rank_rtol = (
            None if rank_rtol is None else check_positive("rank_rtol", rank_rtol, allow_zero=True)
        )
        super().__init__(optimizer, num_tasks, **kwargs)
        self.pref_vector = p

    def _repr_options(self) -> str:
        p = None if self.pref_vector is None else self.pref_vector.tolist()
        return (
            f"pref_vector={p}, scale_mode={self.scale_mode!r}, rank_rtol={self.rank_rtol}, "
            f"{super()._repr_options()}"
        )

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """:func:`_alignedmtl_weights_np` on the step's host Gram matrix."""
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        c, lam, rank = _alignedmtl_weights_np(
            gram, self.pref_vector, self.scale_mode, self.rank_rtol
        )
        return c, {"eigenvalues": lam, "rank": rank}
