"""LSPR, loss-balanced small perturbation regularization [R], and its automatic ratio.

:class:`LSPR` trains the perturbed copy on the labels: it mixes the clean and perturbed task
losses with a fixed weight ``rho`` or, for ``rho="auto"``, with the detached ratio
:func:`lspr_auto_ratio` that gives the perturbed term the clean one's magnitude.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ._base import PerturbationRegularizer, PerturbedRun, _stack
from ._checks import _check_real


def lspr_auto_ratio(clean: Tensor, perturbed: Tensor, max_ratio: float = 10.0) -> Tensor:
    """LSPR's ``c = clamp(sg(L_clean) / sg(L_pert), 0, max_ratio)`` [R] (detached).

    ``L_pert = 0`` gives ``max_ratio`` (``1`` when ``L_clean = 0`` too); a negative ratio (losses
    are expected to be non-negative) gives ``0``. NaN propagates.
    """
    lc = clean.detach()
    lp = perturbed.detach()
    one = torch.ones_like(lc)
    safe = torch.where(lp > 0, lp, one)
    fallback = torch.where(lc > 0, one * max_ratio, one)
    ratio = torch.where(lp > 0, lc / safe, fallback)
    return torch.where(torch.isnan(ratio), ratio, ratio.clamp(0.0, max_ratio))


class LSPR(PerturbationRegularizer):
    """Loss-balanced small perturbation regularization: train the perturbed copy on the labels.

    Placeholder design [R] (the paper's loss was not available; ``reference/methods.md`` §5.B)::

        z~      = z + s * xi                                  (see PerturbationRegularizer)
        Lc_k    = task_loss_k(f_k(z), y_k),   Lp_k = task_loss_k(f_k(z~), y_k)
        fixed:  L_k = (1 - rho) * Lc_k + rho * Lp_k           (rho in [0, 1])
        "auto": c_k = clamp(sg(Lc_k) / sg(Lp_k), 0, max_ratio)
                L_k = 1/2 * (Lc_k + c_k * Lp_k)

    ``"auto"`` makes the perturbed term's magnitude equal to the clean one's (``c_k Lp_k =
    Lc_k`` unless clamped), so ``L_k`` has the value ``Lc_k``: the total loss scale is unchanged.
    Equivalently ``L_k = s_t [(1 - rho_t) Lc_k + rho_t Lp_k]`` with the per-step, per-task
    ``rho_t = Lc_k / (Lc_k + Lp_k)`` and ``s_t = (Lc_k + Lp_k) / (2 Lp_k)`` (both detached).
    ``max_ratio`` bounds the up-weighting of a perturbed loss much smaller than the clean one
    (``Lp_k -> 0``).

    Args:
        epsilon, relative, noise, seed, device: see :class:`PerturbationRegularizer`.
        rho: mixing weight in ``[0, 1]`` (default 0.5) or ``"auto"``; ``0`` switches the
            regularizer off, ``1`` trains on the perturbed copy only.
        max_ratio: upper clamp of ``c_k`` for ``rho="auto"`` (default 10.0, > 0).
        weight: alias of ``rho`` (the generic name of DESIGN.md's table); give one of them.

    ``last`` (detached, float64, ``(K,)``): ``clean`` and ``perturbed`` task losses, ``ratio``
    ``c_k`` (``"auto"`` only) and ``total`` returned losses.
    """

    def __init__(
        self,
        epsilon: float = 1e-2,
        *,
        rho: float | Literal["auto"] | None = None,
        max_ratio: float = 10.0,
        relative: bool = True,
        noise: Literal["gaussian", "uniform"] = "gaussian",
        seed: int = 0,
        device: torch.device | str = "cpu",
        weight: float | Literal["auto"] | None = None,
    ) -> None:
        if rho is not None and weight is not None:
            raise ValueError("pass rho= or its alias weight=, not both")
        given = rho if rho is not None else weight
        self.rho = 0.5 if given is None else given
        m = _check_real("max_ratio", max_ratio, low=0.0)
        if m == 0.0:
            raise ValueError("max_ratio must be > 0, got 0")
        self.max_ratio = m
        super().__init__(epsilon, relative=relative, noise=noise, seed=seed, device=device)

    @property
    def rho(self) -> float | str:
        """The mixing weight in ``[0, 1]`` or ``"auto"``."""
        return self._rho

    @rho.setter
    def rho(self, value: float | str) -> None:
        if isinstance(value, str):
            if value != "auto":
                raise ValueError(f"rho must be a number in [0, 1] or 'auto', got {value!r}")
            self._rho: float | str = value
        else:
            self._rho = _check_real("rho", value, low=0.0, high=1.0)

    @property
    def weight(self) -> float | str:
        """Alias of :attr:`rho`."""
        return self.rho

    @weight.setter
    def weight(self, value: float | str) -> None:
        self.rho = value

    def _strength(self) -> float:
        return 1.0 if self.rho == "auto" else float(self.rho)

    def _repr_options(self) -> str:
        return f"rho={self.rho!r}, max_ratio={self.max_ratio!r}, {super()._repr_options()}"

    def _combine(
        self, run: PerturbedRun, frozen: dict[str, Any] | None
    ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Any]]:
        clean = run.clean
        pert = [
            self._loss(k, run.fns[k], run.pert_out[k], run.targets[k]) for k in range(len(clean))
        ]
        diagnostics = {"perturbed": _stack(pert)}
        if self.rho == "auto":
            if frozen is not None and "ratio" in frozen:
                ratios = frozen["ratio"]
            else:
                ratios = [lspr_auto_ratio(lc, lp, self.max_ratio) for lc, lp in zip(clean, pert)]
            diagnostics["ratio"] = _stack(ratios)
            losses = [0.5 * (lc + c * lp) for lc, c, lp in zip(clean, ratios, pert)]
            return losses, diagnostics, {"ratio": ratios}
        rho = float(self.rho)
        if rho == 0.0:
            return list(clean), diagnostics, {}
        if rho == 1.0:
            return pert, diagnostics, {}
        return [(1.0 - rho) * lc + rho * lp for lc, lp in zip(clean, pert)], diagnostics, {}
