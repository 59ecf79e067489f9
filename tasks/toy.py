"""The 2-D two-objective toy problem of the CAGrad / Nash-MTL / FAMO papers.

For ``x = (x1, x2)`` and ``LOWER = 5e-6``::

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, LOWER)) + 6
    g1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    g2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(0.5 x2), 0);   c2 = max(tanh(-0.5 x2), 0)
    L1 = c1 f1 + c2 g1;          L2 = c1 f2 + c2 g2

The imbalanced setting of Nash-MTL / FAMO multiplies the losses by :data:`TOY_SCALES`
(``L1 * 0.1``); the usual runs start from :data:`TOY_STARTS` with Adam, lr 1e-3, 35k-50k steps.

Pareto set: x1 in [-7, 7] with x2 close to -8.355. In the region x2 < 0 the losses are
``c2(x2) g_k(x)``; Pareto stationarity (a convex combination of the two gradients vanishes)
forces ``lambda = (x1 + 7) / 14`` from the x1 components and then, from the x2 components,

    c2'(x2) [(49 - x1^2) / 10 - 20 + 0.01 (x2 + 8)^2] + 0.02 c2(x2) (x2 + 8) = 0,

whose root is x2 = -8.3551 at x1 = 0 and drifts to -8.4345 at x1 = +-7; :func:`pareto_front`
solves it numerically (the often-quoted "x2 = -8.3552" is the x1 = 0 value).

:class:`ToyModel` wraps the problem as a multi-task "model" so balancers can run on it unchanged::

    model = ToyModel(start=TOY_STARTS[0], scales=TOY_SCALES)
    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-3), num_tasks=2)
    out = model()
    info = opt.backward(out.task_outputs, shared_parameters=model.shared_parameters())
    opt.step()
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtl.models import ModelOutput

__all__ = [
    "LOWER",
    "TOY_STARTS",
    "TOY_SCALES",
    "toy_losses",
    "pareto_front",
    "pareto_front_losses",
    "loss_grid",
    "ToyModel",
]

LOWER = 5e-6
"""Lower clamp inside the logarithms of f1 and f2."""

TOY_STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
"""The five starting points of the Nash-MTL / FAMO trajectory figure."""

TOY_SCALES: tuple[float, float] = (0.1, 1.0)
"""Per-task loss scales of the imbalanced setting (L1 multiplied by 0.1)."""


def toy_losses(x: Tensor, scales: Sequence[float] | Tensor | None = None) -> Tensor:
    """The two toy losses ``(L1, L2)`` at ``x`` (differentiable).

    Args:
        x: tensor of shape ``(..., 2)`` (a point, or any batch of points).
        scales: optional per-task multipliers, e.g. :data:`TOY_SCALES`; ``None`` = (1, 1).

    Returns:
        Tensor of shape ``(..., 2)``.
    """
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.shape[-1:] != (2,):
        raise ValueError(f"x must have shape (..., 2), got {tuple(x.shape)}")
    x1, x2 = x[..., 0], x[..., 1]
    th = torch.tanh(-x2)
    f1 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 - 7) - th), min=LOWER)) + 6
    f2 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 + 3) + th + 2), min=LOWER)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    out = torch.stack([c1 * f1 + c2 * g1, c1 * f2 + c2 * g2], dim=-1)
    if scales is not None:
        s = torch.as_tensor(scales, dtype=out.dtype, device=out.device)
        if s.shape != (2,):
            raise ValueError(f"scales must have 2 entries, got shape {tuple(s.shape)}")
        out = out * s
    return out


def _stationarity(x2: np.ndarray, x1: np.ndarray) -> np.ndarray:
    t = np.tanh(0.5 * x2)
    c2 = -t
    dc2 = -0.5 * (1.0 - t * t)
    g = (49.0 - x1**2) / 10.0 - 20.0 + 0.01 * (x2 + 8.0) ** 2
    return dc2 * g + 0.02 * c2 * (x2 + 8.0)


def pareto_front(n: int = 100, x1_range: tuple[float, float] = (-7.0, 7.0)) -> np.ndarray:
    """Points of the Pareto set: ``n`` values of x1 evenly spaced in ``x1_range`` (within
    [-7, 7]) with the Pareto-stationary x2 (about -8.355 to -8.435) found by bisection.

    Returns:
        float64 array ``(n, 2)`` of ``(x1, x2)``.
    """
    lo_x1, hi_x1 = x1_range
    if not -7.0 <= lo_x1 <= hi_x1 <= 7.0:
        raise ValueError(f"x1_range must lie within [-7, 7], got {x1_range}")
    x1 = np.linspace(lo_x1, hi_x1, int(n))
    lo = np.full_like(x1, -9.5)  # stationarity residual < 0 here
    hi = np.full_like(x1, -8.0)  # and > 0 here
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        pos = _stationarity(mid, x1) > 0
        hi = np.where(pos, mid, hi)
        lo = np.where(pos, lo, mid)
    return np.stack([x1, 0.5 * (lo + hi)], axis=1)


def pareto_front_losses(n: int = 100, scales: Sequence[float] | None = None) -> np.ndarray:
    """The loss values ``(L1, L2)`` along :func:`pareto_front` (float64 array ``(n, 2)``)."""
    pts = torch.from_numpy(pareto_front(n))
    return toy_losses(pts, scales).numpy()


def loss_grid(
    lim: tuple[float, float] = (-10.0, 10.0), n: int = 200, scales: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Losses on an ``n x n`` grid for contour plots.

    Returns:
        ``(X1, X2, L)`` with ``X1, X2`` of shape ``(n, n)`` (``meshgrid``, xy indexing) and
        ``L`` of shape ``(n, n, 2)``.
    """
    g = np.linspace(lim[0], lim[1], int(n))
    x1, x2 = np.meshgrid(g, g)
    pts = torch.from_numpy(np.stack([x1, x2], axis=-1))
    return x1, x2, toy_losses(pts, scales).numpy()


class ToyModel(nn.Module):
    """The toy problem as a two-task "model" whose only parameter is the point ``x``.

    ``forward()`` ignores its (optional) input and returns a
    :class:`mtl.models.ModelOutput` whose ``task_outputs`` ARE the two (scaled) losses, as
    0-dim tensors to pass directly to ``BalancedOptimizer.backward``, and whose
    ``representation`` is ``x.unsqueeze(0)`` (shape ``(1, 2)``), a non-leaf view of the
    parameter. Balancing at the parameter level
    (``shared_parameters=model.shared_parameters()``, i.e. ``[model.x]``) is the natural
    choice; the representation level gives the same per-task gradients here.

    Args:
        start: the initial point, e.g. one of :data:`TOY_STARTS`.
        scales: per-task loss scales (:data:`TOY_SCALES` for the imbalanced setting), or None.
        dtype: parameter dtype (float32 like the reference code; float64 for exact studies).
    """

    def __init__(
        self,
        start: Sequence[float] = (0.0, 0.0),
        scales: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        st = torch.as_tensor(start, dtype=dtype)
        if st.shape != (2,):
            raise ValueError(f"start must be a point (x1, x2), got shape {tuple(st.shape)}")
        if scales is not None and len(scales) != 2:
            raise ValueError(f"scales must have 2 entries, got {len(scales)}")
        self.x = nn.Parameter(st.clone())
        self.scales: tuple[float, float] | None = (
            None if scales is None else (float(scales[0]), float(scales[1]))
        )

    def forward(self, features: object = None) -> ModelOutput:
        """Evaluate the losses at the current ``x`` (``features`` is ignored)."""
        del features
        z = self.x.unsqueeze(0)
        losses = toy_losses(z, self.scales)[0]
        return ModelOutput(task_outputs=[losses[0], losses[1]], representation=z)

    def losses(self) -> Tensor:
        """The two losses at the current point, shape ``(2,)``."""
        return toy_losses(self.x, self.scales)

    def shared_parameters(self) -> list[nn.Parameter]:
        """``[self.x]``: the parameter every task depends on."""
        return [self.x]
