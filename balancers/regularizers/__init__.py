"""Perturbation regularizers SCR and LSPR: loss terms that compose with every balancer.

**Placeholder design [R].** Ramazanli et al., *Beyond Self-Consistency: Loss-Balanced
Perturbation-Based Regularization Improves Industrial-Scale Ads Ranking* (arXiv 2502.18478)
introduce SCR (self-consistency regularization) and LSPR (loss-balanced small perturbation
regularization), but only the abstract and a summary were available. What is perturbed, the
perturbation law and size, SCR's divergence, LSPR's loss and what "loss-balanced" balances are
NOT known: every formula below is a documented developer decision (tag [R] in
``reference/methods.md`` §5.B), never the paper's method. See ``docs/methods.md (SCR and LSPR)``.

These classes are not optimizers. They PRODUCE the K per-task losses, which then go into
``opt.backward(losses, representation=...)`` of any balancer (or a plain
``sum(losses).backward()``)::

    reg = LSPR(epsilon=1e-2, rho=0.5)             # or SCR(epsilon=1e-2, weight=1.0)
    out = model(x)
    losses = reg(out.representation, heads, targets, ["binary", "binary"],
                 outputs=out.task_outputs)
    info = opt.backward(losses, representation=out.representation)

``heads`` maps a representation to the K task outputs (the part of the model above the
perturbation); the perturbed branch ``z~ = z + noise`` is a function of ``z``, so the gradient
``h_k = dL_k/dz`` the balancer sees includes both branches. Cost: one extra forward of ``heads``
(and its backward) per step. For balancers that re-evaluate the losses at a shifted point
(MARIGOLD's ``estimator="fd"``), ``reg.closure(heads, targets, loss_fns)`` replays the same
noise.

The package's modules: ``_base`` (:class:`PerturbationRegularizer`, the shared machinery),
``_noise`` (noise scale, law and addition), ``_tasks`` (the task losses), ``_scr`` (SCR and its
divergence), ``_lspr`` (LSPR and its automatic ratio), ``_checks`` (option validation). Import
everything from ``balancers.regularizers``.
"""

from __future__ import annotations

from ._base import Heads, PerturbationRegularizer, _stack  # noqa: F401  (re-exported)
from ._checks import _check_bool, _check_choice, _check_real  # noqa: F401  (re-exported)
from ._lspr import LSPR, lspr_auto_ratio
from ._noise import (  # noqa: F401  (re-exported)
    _SQRT3,
    NOISES,
    Representation,
    _add,
    _replay_mismatch,
    draw_noise,
    noise_scale,
    perturb,
)
from ._scr import DIVERGENCES, SCR, consistency_divergence, symmetric_bernoulli_kl  # noqa: F401
from ._tasks import (  # noqa: F401  (re-exported)
    KINDS,
    LossFn,
    LossSpec,
    _builtin,
    _infer_kind,
    _match_target,
    task_loss,
)

__all__ = [
    "LSPR",
    "SCR",
    "PerturbationRegularizer",
    "consistency_divergence",
    "draw_noise",
    "lspr_auto_ratio",
    "noise_scale",
    "perturb",
    "symmetric_bernoulli_kl",
    "task_loss",
]
