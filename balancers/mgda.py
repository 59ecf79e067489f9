"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm point of the task gradients."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._min_norm import min_norm_weights

__all__ = ["MGDA", "mgda_weights"]

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _scales(normalization: str, gram: Tensor, losses: Tensor, eps: float) -> Tensor:
    norms = gram.diagonal().clamp(min=0).sqrt()
    if normalization == "none":
        return torch.ones_like(losses)
    if normalization in ("loss", "loss+") and bool((losses < 0).any()):
        raise ValueError(
            f"normalization={normalization!r} needs non-negative losses, got {losses.tolist()}"
        )
    if normalization == "l2":
        s = norms
    elif normalization == "loss":
        s = losses.clone()
    else:
        s = losses * norms
    # a zero gradient (or zero loss) stays zero after normalisation instead of dividing by zero
    return torch.where(s > eps, s, torch.ones_like(s))


def mgda_weights(
    gram: Tensor,
    losses: Tensor | None = None,
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

    Returns:
        ``(c, alpha)``: the coefficients to apply and the simplex weights, float64 ``(K,)``.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    gram = gram.to(torch.float64)
    k = gram.shape[0]
    if losses is None:
        if normalization in ("loss", "loss+"):
            raise ValueError(f"normalization={normalization!r} needs the losses")
        losses = torch.ones(k, dtype=torch.float64)
    losses = losses.to(torch.float64)
    s = _scales(normalization, gram, losses, eps)
    alpha = min_norm_weights(gram / torch.outer(s, s), max_iter=max_iter, tol=tol).to(gram.device)
    return (alpha / s if normalized_update else alpha), alpha


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
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.extras``: ``alpha`` (simplex weights) and ``scales``.
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
        **kwargs: Any,
    ) -> None:
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        super().__init__(optimizer, num_tasks, **kwargs)
        self.normalization = normalization
        self.normalized_update = bool(normalized_update)
        self.max_iter = max_iter
        self.tol = tol
        self._last: dict[str, Tensor] = {}

    def _repr_options(self) -> str:
        return (
            f"normalization={self.normalization!r}, normalized_update={self.normalized_update}, "
            f"{super()._repr_options()}"
        )

    def _compute_weights(
        self, gram: Tensor | None, losses: Tensor, block_grams: Tensor | None
    ) -> Tensor:
        assert gram is not None
        c, alpha = mgda_weights(
            gram,
            losses,
            normalization=self.normalization,
            normalized_update=self.normalized_update,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        self._last = {"alpha": alpha}
        return c

    def _extras(self) -> dict[str, Any]:
        return dict(self._last)
