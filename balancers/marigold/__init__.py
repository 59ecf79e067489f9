"""MARIGOLD [R]: task weights from a zeroth-order estimate of the MGDA objective's gradient.

Chen et al., "Feed m Birds with One Scone: Accelerating Multi-task Gradient Balancing via
Bi-level Optimization" (arXiv 2603.07389). Only the abstract was available: the bi-level view,
"zeroth-order solver" and "no per-task gradients" are the paper's [A]; EVERYTHING below (the
algorithm, the estimators, the step rule, the defaults) is a documented reconstruction [R]
(``docs/methods.md``, section MARIGOLD), never a claim of fidelity to the paper.

Bi-level view [R]::

    lower level:  theta <- optimizer_step(theta, g_lam),   g_lam = grad_theta sum_k lam_k L_k
    upper level:  min_{lam in simplex} F(lam) = 1/2 |sum_k lam_k g_k|^2        (MGDA, Eq. 3)
                  grad F(lam) = M lam = [g_i . g_lam]_i                         (M = G G^T)

``M lam`` is the vector of directional derivatives of the task losses along the update direction
``g_lam``; it is estimated from loss VALUES, so no per-task gradient is ever formed. One backward
pass of the weighted loss per step gives ``g_lam``, which is both the model's update and the
direction of the estimate ("one scone feeds m birds"). Estimators ``h ~ M lam``:

* ``"fd"`` (E1, default): ``h = (l(theta) - l(theta - a g_lam)) / a`` on the SAME batch, one extra
  forward through the user's ``closure``; ``a = fd_step / |g_lam|`` (the shift has norm
  ``fd_step``). Exact for linear losses. ``fd_scheme`` ``"forward_closure"`` (baseline recomputed
  by the closure) and ``"central"`` (``(l(theta + a g) - l(theta - a g)) / 2a``) cost two.
* ``"amortized"`` (E2): no extra forward; ``h_t = (l_{t-1} - l_t) / eta_{t-1}`` from consecutive
  steps (different batches; exact for plain SGD on linear losses; noisier).
* ``"gaussian"`` (E3): Gaussian smoothing in lam-space with ``q`` perturbations, each one more
  backward pass (``1 + q`` in all): kept for completeness, NOT cheaper.

Weight step (fixed point = the MGDA weights, KKT: ``h_i`` equal on the support)::

    simplex:  lam <- Proj_simplex(lam - s * lr_weights * n(h))
    softmax:  xi  <- xi - s * lr_weights * lam * (n(h) - lam . n(h)),  lam = softmax(xi)
    n(h) = h / |g_lam|^2 ("grad_norm"), h / max_i |h_i| ("max_abs") or h ("none")
    s in [min_step_scale, 1]: secant step control (overshoot along the last move shrinks s)
"""

from ._functional import (
    DEFAULT_FD_STEP,
    DEFAULT_LR_WEIGHTS,
    gaussian_estimate_np,
    gaussian_smoothing_estimate,
    marigold_step,
    normalize_estimate,
)
from ._optimizer import MARIGOLD

__all__ = [
    "DEFAULT_FD_STEP",
    "DEFAULT_LR_WEIGHTS",
    "MARIGOLD",
    "gaussian_estimate_np",
    "gaussian_smoothing_estimate",
    "marigold_step",
    "normalize_estimate",
]
