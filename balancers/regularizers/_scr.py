"""SCR, self-consistency regularization [R], and its divergence ``D(f(z), f(z~))``.

:class:`SCR` adds ``weight * D_k`` between the clean and perturbed outputs of every task to its
clean task loss; :func:`consistency_divergence` is ``D`` (:func:`symmetric_bernoulli_kl` of
logits, or the mean squared difference).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ._base import PerturbationRegularizer, PerturbedRun, _stack
from ._checks import _check_bool, _check_choice, _check_real

DIVERGENCES: tuple[str, ...] = ("auto", "kl", "mse")


def symmetric_bernoulli_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean symmetric KL between Bernoulli(sigmoid(a)) and Bernoulli(sigmoid(b)) [R].

    ``KL(p||q) + KL(q||p) = (p - q) * (a - b)`` with ``p = sigmoid(a)``, ``q = sigmoid(b)``
    (exact identity; no logarithm, so it is finite for any finite logits), averaged over all
    elements. Non-negative, symmetric, zero iff ``a == b``.
    """
    p = torch.sigmoid(logits_p)
    q = torch.sigmoid(logits_q)
    return ((p - q) * (logits_p - logits_q)).mean()


def consistency_divergence(clean: Tensor, perturbed: Tensor, divergence: str) -> Tensor:
    """SCR's ``D(f(z), f(z~))`` [R]: ``"kl"`` = :func:`symmetric_bernoulli_kl` of the logits,
    ``"mse"`` = ``mean((f(z) - f(z~))^2)`` (for regression outputs, or on logits)."""
    if divergence == "kl":
        return symmetric_bernoulli_kl(clean, perturbed)
    if divergence == "mse":
        return (clean - perturbed).square().mean()
    raise ValueError(f"unknown divergence {divergence!r}; expected 'kl' or 'mse'")


class SCR(PerturbationRegularizer):
    """Self-consistency regularization: penalise disagreement between clean and perturbed outputs.

    Placeholder design [R] (the paper's loss was not available; ``reference/methods.md`` §5.B)::

        z~   = z + s * xi                                    (see PerturbationRegularizer)
        L_k  = task_loss_k(f_k(z), y_k) + weight * D_k(f_k(z), f_k(z~))
        D_k  = (p - q)(a - b),  p = sigmoid(a), q = sigmoid(b)   binary: symmetric Bernoulli KL
             = mean((a - b)^2)                                   regression: MSE
        (a = f_k(z), b = f_k(z~); D averaged over the batch)

    With ``stop_grad_clean=True`` the clean branch enters ``D`` detached (``a -> sg(a)``): the
    consistency term then only moves the perturbed prediction toward the clean one. The task
    loss is never applied to the perturbed outputs (no labels are used on ``z~``).

    Args:
        epsilon, relative, noise, seed, device: see :class:`PerturbationRegularizer`.
        weight: ``lambda_c >= 0`` (default 1.0); ``0`` switches the regularizer off.
        divergence: ``"auto"`` (default: symmetric Bernoulli KL for binary tasks, MSE for
            regression), ``"kl"`` (KL for every task; outputs must be logits) or ``"mse"``
            (MSE for every task, on logits for binary tasks).
        stop_grad_clean: detach the clean branch inside ``D`` (default ``False``).

    ``last`` (detached, float64, ``(K,)``): ``clean`` task losses, ``consistency`` ``D_k`` and
    ``total`` returned losses.
    """

    def __init__(
        self,
        epsilon: float = 1e-2,
        *,
        weight: float = 1.0,
        divergence: Literal["auto", "kl", "mse"] = "auto",
        stop_grad_clean: bool = False,
        relative: bool = True,
        noise: Literal["gaussian", "uniform"] = "gaussian",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.weight = weight
        self.divergence = _check_choice("divergence", divergence, DIVERGENCES)
        self.stop_grad_clean = _check_bool("stop_grad_clean", stop_grad_clean)
        super().__init__(epsilon, relative=relative, noise=noise, seed=seed, device=device)

    @property
    def weight(self) -> float:
        """``lambda_c``, the consistency weight (``>= 0``)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = _check_real("weight", value, low=0.0)

    def _strength(self) -> float:
        return self.weight

    def _repr_options(self) -> str:
        return (
            f"weight={self.weight!r}, divergence={self.divergence!r}, "
            f"stop_grad_clean={self.stop_grad_clean}, {super()._repr_options()}"
        )

    def _divergence_of(self, k: int, kind: str | None) -> str:
        if self.divergence == "mse":
            return "mse"
        if self.divergence == "kl":
            if kind == "regression":
                raise ValueError(
                    f"divergence='kl' needs logits, but task {k} is a regression task; use "
                    "divergence='auto' or 'mse'"
                )
            return "kl"
        if kind is None:
            raise ValueError(
                f"divergence='auto' needs the kind of task {k}: pass loss 'binary'/'regression', "
                "kinds=[...], or choose divergence='kl'/'mse'"
            )
        return "kl" if kind == "binary" else "mse"

    def _combine(
        self, run: PerturbedRun, frozen: dict[str, Any] | None
    ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Any]]:
        divs = [self._divergence_of(k, kind) for k, kind in enumerate(run.kinds)]
        terms = []
        for a, b, div in zip(run.clean_out, run.pert_out, divs):
            if b.shape != a.shape:
                raise ValueError(
                    f"perturbed output shape {tuple(b.shape)} differs from the clean output "
                    f"shape {tuple(a.shape)}"
                )
            terms.append(consistency_divergence(a.detach() if self.stop_grad_clean else a, b, div))
        w = self.weight
        losses = [c + w * d for c, d in zip(run.clean, terms)]
        return losses, {"consistency": _stack(terms)}, {}
