"""MARIGOLD [R]: task weights from a zeroth-order estimate of the MGDA objective's gradient.

Chen et al., "Feed m Birds with One Scone: Accelerating Multi-task Gradient Balancing via
Bi-level Optimization" (arXiv 2603.07389). Only the abstract was available: the bi-level view,
"zeroth-order solver" and "no per-task gradients" are the paper's [A]; EVERYTHING below (the
algorithm, the estimators, the step rule, the defaults) is a documented reconstruction [R]
(``/work/shared/reference/methods.md`` section 3.B, ``docs/methods.md (MARIGOLD)``), never a claim
of fidelity to the paper.

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

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from mtl import BalancedOptimizer, BalanceInfo, depends_on
from mtl._autocast import autocast_off, forward_autocast
from mtl._checks import check_reached, check_trunk
from mtl._combine import (
    accumulate_head_grads,
    register_grad_hook,
    replace_grad,
    weighted_sum,
)
from mtl._gram import rescaled_gram
from mtl._graph import analyse_graph
from mtl._host import to_host

from ._host import host_array, to_torch
from ._min_norm import _project_simplex_np, project_simplex
from .pcgrad import _rng_from_torch_state

__all__ = [
    "MARIGOLD",
    "gaussian_smoothing_estimate",
    "marigold_step",
    "normalize_estimate",
]

Estimator = Literal["fd", "amortized", "gaussian"]
Parametrization = Literal["simplex", "softmax"]
Normalize = Literal["auto", "grad_norm", "max_abs", "none"]
FDScheme = Literal["forward", "forward_closure", "central"]
StepControl = Literal["secant", "none"]
Level = Literal["representation", "parameters"]

_ESTIMATORS = ("fd", "amortized", "gaussian")
_PARAMETRIZATIONS = ("simplex", "softmax")
_NORMALIZE = ("auto", "grad_norm", "max_abs", "none")
_FD_SCHEMES = ("forward", "forward_closure", "central")
_STEP_CONTROLS = ("secant", "none")

#: default weight step size (dimensionless with the default normalisation)
DEFAULT_LR_WEIGHTS = 0.05
#: default norm of the finite-difference shift, in units of the balance point (parameters or z)
DEFAULT_FD_STEP = 1e-3
#: weight moves smaller than this (max-abs, on the simplex) are not used by the step control
_MIN_MOVE = 1e-10
#: squared gradient norms at or below this are treated as zero (no information, lam unchanged)
_TINY = 1e-30

#: the closure: ``() -> losses`` (parameter level) or ``(shifted representation) -> losses``
Closure = Callable[..., Sequence[Tensor | float] | Tensor]


# ---------------------------------------------------------------------- pure functions
def normalize_estimate(h: Tensor, mode: str, grad_norm_sq: float | None = None) -> Tensor:
    """Scale-free version ``n(h)`` of an estimate ``h ~ M lam`` (float64).

    * ``"grad_norm"``: ``h / |g_lam|^2``. For the exact ``h = M lam`` this is
      ``g_i . g_lam / |g_lam|^2``, the relative directional derivative of task ``i``: it equals 1
      for every task on the support of the MGDA weights at their optimum (KKT) and its
      ``lam``-average is always 1. Needs ``grad_norm_sq = |g_lam|^2``.
    * ``"max_abs"``: ``h / max_i |h_i|`` (needs nothing else; every entry in [-1, 1]).
    * ``"none"``: ``h`` unchanged (units of squared gradients: the step shrinks with them).

    A zero scale (zero gradient, zero estimate) gives a zero vector: no information, no step.
    """
    return to_torch(_normalize_np(host_array(h), mode, grad_norm_sq), h.device)


def marigold_step(
    weights: Tensor,
    h_normalized: Tensor,
    lr: float,
    *,
    parametrization: str = "simplex",
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One upper-level step; returns ``(new_weights, new_logits)`` (logits ``None`` for simplex).

    * ``"simplex"``: ``lam' = Proj_simplex(lam - lr * n)`` (Euclidean projection, Duchi et al.).
      Fixed points are exactly the KKT points of ``min_{lam in simplex} lam^T M lam`` when
      ``n`` is a positive multiple of ``M lam``: ``n_i = c`` where ``lam_i > 0``, ``n_i >= c``
      elsewhere, i.e. the MGDA weights.
    * ``"softmax"``: ``xi' = xi - lr * J^T n`` with ``J = diag(lam) - lam lam^T`` the softmax
      Jacobian, i.e. ``xi' = xi - lr * lam * (n - lam . n)``; ``lam' = softmax(xi')``. Interior
      fixed points are the same; a zero MGDA weight is only approached asymptotically.
    """
    lam = weights.detach().to(torch.float64)
    n = h_normalized.detach().to(torch.float64).to(lam.device)
    if parametrization == "simplex":
        return project_simplex(lam - lr * n), None
    if parametrization == "softmax":
        if logits is None:
            raise ValueError("parametrization='softmax' needs the current logits")
        xi = logits.detach().to(torch.float64) - lr * lam * (n - torch.dot(lam, n))
        return torch.softmax(xi, 0), xi
    raise ValueError(f"parametrization must be one of {_PARAMETRIZATIONS}, got {parametrization!r}")


def gaussian_smoothing_estimate(
    objective: Callable[[Tensor], Tensor | float],
    weights: Tensor,
    *,
    num_perturbations: int,
    mu: float,
    generator: torch.Generator | None = None,
    project: bool = True,
    value: float | None = None,
) -> Tensor:
    """Gaussian-smoothing zeroth-order gradient of ``objective`` at ``weights`` (E3) [R].

    ``g = (1/q) sum_{j=1..q} (F(lam + mu u_j) - F(lam)) / mu * u_j`` with ``u_j ~ N(0, I_K)``
    (float64, drawn from ``generator``), projected on ``{sum u = 0}`` when ``project`` (the
    simplex's tangent space; ``E[g] = P grad F`` with ``P = I - 11^T/K`` then). For a quadratic
    ``F`` the estimator is unbiased for any ``mu`` (the odd moments of ``u`` vanish).

    Args:
        objective: ``F``, called with a ``(K,)`` float64 tensor; returns a scalar.
        weights: ``lam``, ``(K,)``.
        num_perturbations: ``q >= 1``.
        mu: smoothing radius ``> 0``.
        generator: source of the directions (``None``: the global CPU generator).
        project: project the directions on ``{sum u = 0}`` (default ``True``).
        value: ``F(lam)`` when already known (saves one evaluation).
    """
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
        raise TypeError(f"num_perturbations must be an int, got {num_perturbations!r}")
    if num_perturbations < 1:
        raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations}")
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu must be a positive finite number, got {mu!r}")
    lam = weights.detach().to(torch.float64).cpu()
    k = lam.numel()
    u = torch.randn(num_perturbations, k, generator=generator, dtype=torch.float64)
    if project:
        u = u - u.mean(1, keepdim=True)
    f0 = float(objective(lam)) if value is None else float(value)
    est = torch.zeros(k, dtype=torch.float64)
    for j in range(num_perturbations):
        fj = float(objective(lam + mu * u[j]))
        est += (fj - f0) / mu * u[j]
    return est / num_perturbations


# ---------------------------------------------------------------------- the optimizer
class MARIGOLD(BalancedOptimizer):
    """MARIGOLD [R]: bi-level task weighting with no per-task gradients (reconstruction).

    Per step (all [R], see ``docs/methods.md (MARIGOLD)``)::

        1. losses l(theta) = (L_1..L_K) on the batch (the user's forward)
        2. ONE backward of sum_k lam_k L_k -> g_lam (shared part); heads get their own
           unweighted task gradient (weight_heads=False, default) or lam-weighted ones
        3. h ~ M lam = [g_i . g_lam]_i from loss values (estimator, below)
        4. lam <- Proj_simplex(lam - s * lr_weights * n(h))   (or softmax logits)
        5. opt.step() moves the model along g_lam (the same gradient)

    Step control (``step_control="secant"``, default): with ``n(h) = h / |g_lam|^2`` the plain
    step contracts only while ``lr_weights * L_T / |d|^2 < 2`` (``L_T`` the curvature of
    ``F`` on the simplex, ``|d|^2`` the min-norm value), which fails as training approaches a
    Pareto-stationary point (``|d| -> 0``) and lam then oscillates. After each move
    ``delta`` of lam taken with slope ``q = h . delta < 0``, the next estimate AT the arrival
    point gives ``p = h' . delta``; the best multiple of the move was ``q / (q - p)`` (exact for
    the quadratic ``F``), and the multiplier ``s`` of ``lr_weights`` is multiplied by it
    (clipped to [1/2, 2]) and kept in ``[min_step_scale, 1]``: the control only damps.

    Under DDP the losses and ``h`` are all-reduced (one float64 vector per step) so every rank
    computes the same lam, equal to one process on the global batch (parameter level: the
    estimate uses DDP's averaged ``g_lam``; representation level: ``h`` and ``|g_z|^2`` are
    ``sum_r / W^2`` and the shift uses the global norm).

    ``BalanceInfo.weights`` is the ``lam`` used for this step's gradient (the update of step 4
    applies from the next call), ``gram`` is ``None`` (never computed).

    Estimators of ``h`` (``a = fd_step / |g_lam|``; losses differenced in float64):

    * ``"fd"`` (default): ``fd_scheme="forward"``: ``h = (l(theta) - l(theta - a g_lam)) / a``
      with ``l(theta)`` the losses passed to :meth:`backward` and ``l(theta - a g_lam)`` from
      ONE call of ``closure``; ``"forward_closure"``: both terms from the closure (two calls);
      ``"central"``: ``h = (l(theta + a g_lam) - l(theta - a g_lam)) / (2a)`` (two calls,
      O(a^2) bias). Parameter level: the shared parameters are shifted in place under
      ``no_grad`` and restored bit-exactly from saved copies (sparse gradients: only the touched
      rows are saved). Representation level: ``closure`` re-runs only the heads on
      ``z - a g_z`` with ``g_z = d(sum lam_k L_k)/dz``, so ``h ~ M_z lam`` (MGDA-UB's Gram).
    * ``"amortized"``: ``h_t = (l_{t-1} - l_t) / eta_{t-1}``: the change of the losses passed to
      two consecutive calls divided by the inner optimizer's learning rate
      ``param_groups[0]["lr"]`` read at the previous call. Exact (``= M lam_{t-1}``) for plain
      SGD on linear losses of a fixed batch; otherwise biased by batch noise, momentum and
      preconditioning. No update at the first call. Needs one :meth:`backward` per ``step()``.
    * ``"gaussian"``: ``h = (1/q) sum_j (F(lam + mu u_j) - F(lam)) / mu * u_j`` with
      ``F(lam) = |g_lam|^2 / 2`` and ``u_j ~ N(0, I)`` projected on ``{sum u = 0}`` (drawn from
      an own generator seeded by ``seed``, saved in the state dict); each ``F`` is one more
      backward pass (``1 + q`` per step).

    Args:
        optimizer: the inner optimizer over all model parameters.
        num_tasks: K (inferred from the first call when ``None``).
        lr_weights: step size ``gamma >= 0`` of the weight update (default 0.05; 0 freezes lam).
        fd_step: norm of the finite-difference shift ``a |g_lam|`` (default 1e-3).
        estimator: ``"fd"`` (default), ``"amortized"`` or ``"gaussian"``.
        parametrization: ``"simplex"`` (default, projected step) or ``"softmax"`` (logits).
        normalize: ``"auto"`` (default: ``"grad_norm"`` for ``fd``/``gaussian``, ``"max_abs"``
            for ``amortized``), ``"grad_norm"``, ``"max_abs"`` or ``"none"``; see
            :func:`normalize_estimate`.
        fd_scheme: ``"forward"`` (default), ``"forward_closure"`` or ``"central"``.
        num_perturbations: ``q`` for ``"gaussian"`` (default 4).
        mu: smoothing radius for ``"gaussian"`` (default 1e-2).
        eval_mode_closure: module(s) put in ``eval()`` mode while the closure runs (their
            ``training`` flags are restored afterwards): dropout off, batch-norm uses and does
            not update its running statistics. Needs ``fd_scheme="forward_closure"`` or
            ``"central"`` (the losses passed to ``backward`` were computed in training mode).
        step_control: ``"secant"`` (default) or ``"none"`` (fixed ``lr_weights``).
        min_step_scale: lower bound of the secant multiplier ``s`` (default 1e-2).
        seed: seed of the generator of the ``"gaussian"`` directions (default 0).
        **kwargs: options of :class:`mtl.BalancedOptimizer` (``weight_heads``,
            ``on_nonfinite``, ``task_names``, ``process_group``); ``compute_gram=True`` is
            refused (MARIGOLD never forms per-task gradients).

    ``BalanceInfo.extras``: ``estimator``, ``h_hat`` (raw estimate of ``M lam``, float64, or
    ``None`` when none was made), ``h_normalized``, ``grad_norm_sq`` (``|g_lam|^2``),
    ``fd_step_size`` (``a``), ``closure_calls``, ``step_scale`` (``s``), ``next_weights`` and,
    with ``"forward_closure"``, ``baseline_gap`` (closure losses at theta minus the given
    losses).
    """

    requires_gram = False
    needs_closure = True
    accepts_seed = True

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        lr_weights: float = DEFAULT_LR_WEIGHTS,
        fd_step: float = DEFAULT_FD_STEP,
        estimator: Estimator = "fd",
        parametrization: Parametrization = "simplex",
        normalize: Normalize = "auto",
        fd_scheme: FDScheme = "forward",
        num_perturbations: int = 4,
        mu: float = 1e-2,
        eval_mode_closure: nn.Module | Sequence[nn.Module] | None = None,
        step_control: StepControl = "secant",
        min_step_scale: float = 1e-2,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("compute_gram"):
            raise ValueError(
                "MARIGOLD never computes per-task gradients, so compute_gram=True is not "
                "supported (use MGDA for Gram diagnostics)"
            )
        kwargs.pop("compute_gram", None)
        _check_choice("estimator", estimator, _ESTIMATORS)
        _check_choice("parametrization", parametrization, _PARAMETRIZATIONS)
        _check_choice("normalize", normalize, _NORMALIZE)
        _check_choice("fd_scheme", fd_scheme, _FD_SCHEMES)
        _check_choice("step_control", step_control, _STEP_CONTROLS)
        min_step_scale = _check_number("min_step_scale", min_step_scale)
        if min_step_scale > 1:
            raise ValueError(f"min_step_scale must be in (0, 1], got {min_step_scale}")
        lr_weights = _check_number("lr_weights", lr_weights, allow_zero=True)
        fd_step = _check_number("fd_step", fd_step)
        mu = _check_number("mu", mu)
        if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
            raise TypeError(f"num_perturbations must be an int, got {num_perturbations!r}")
        if num_perturbations < 1:
            raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        modules = _check_modules(eval_mode_closure)
        if modules and fd_scheme == "forward":
            raise ValueError(
                "eval_mode_closure needs fd_scheme='forward_closure' or 'central': with "
                "'forward' the baseline l(theta) is the losses passed to backward(), computed in "
                "training mode, while the shifted losses would be computed in eval mode"
            )
        super().__init__(optimizer, num_tasks, compute_gram=False, **kwargs)
        self.lr_weights = lr_weights
        self.fd_step = fd_step
        self.estimator: str = estimator
        self.parametrization: str = parametrization
        self.normalize: str = normalize
        self.fd_scheme: str = fd_scheme
        self.num_perturbations = num_perturbations
        self.mu = mu
        self.eval_mode_closure = modules
        self.step_control: str = step_control
        self.min_step_scale = min_step_scale
        self.seed = seed
        self._generator = np.random.Generator(np.random.PCG64(seed))
        self._amp: list[tuple[str, torch.dtype]] = []  # the closure's autocast (this step)
        if self.num_tasks is not None:
            self._init_state(self.num_tasks)

    # ------------------------------------------------------------------ options and state
    def _repr_options(self) -> str:
        opts = (
            f"estimator={self.estimator!r}, lr_weights={self.lr_weights}, "
            f"parametrization={self.parametrization!r}, normalize={self.normalize!r}"
        )
        if self.estimator == "fd":
            opts += f", fd_step={self.fd_step}, fd_scheme={self.fd_scheme!r}"
        if self.estimator == "gaussian":
            opts += f", num_perturbations={self.num_perturbations}, mu={self.mu}"
        return f"{opts}, {super()._repr_options()}"

    @property
    def weights(self) -> Tensor:
        """The current task weights ``lam`` (float64, on the simplex); a copy."""
        if "weights" not in self.balancer_state:
            raise RuntimeError("the number of tasks is not known yet (pass num_tasks=)")
        return torch.from_numpy(self._state()["weights"].copy())

    def _normalization(self) -> str:
        if self.normalize != "auto":
            return self.normalize
        return "max_abs" if self.estimator == "amortized" else "grad_norm"

    def _init_state(self, k: int) -> None:
        st = self.balancer_state
        if "weights" in st:
            return
        st["parametrization"] = self.parametrization
        st["weights"] = np.full(k, 1.0 / k)
        if self.parametrization == "softmax":
            st["logits"] = np.zeros(k)
        st["num_updates"] = 0
        st["step_scale"] = 1.0  # secant step control: multiplier of lr_weights
        st["moves"] = []  # secant step control: the last weight moves awaiting their check
        st["previous"] = None  # amortized: losses, lr and |g|^2 of the previous call

    def reset_state(self) -> None:
        """Forget the learned weights (back to uniform) and the amortized history."""
        self.balancer_state = {}
        self._generator = np.random.Generator(np.random.PCG64(self.seed))
        if self.num_tasks is not None:
            self._init_state(self.num_tasks)

    def _balancer_state_dict(self) -> dict[str, Any]:
        # the host arrays are saved as CPU float64 tensors (the checkpoint format is unchanged
        # and loads with torch.load(weights_only=True)); the round trip is exact
        st: dict[str, Any] = _to_torch_tree(dict(self._state()))
        if self.estimator == "gaussian":
            # a plain dict of str and int (PCG64's 128-bit state and increment)
            st["rng_state"] = self._generator.bit_generator.state
        return st

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Checks everything first (parametrization, lam on its domain, the generator), then
        replaces the state: a rejected state leaves the optimizer as it was."""
        state = _to_numpy_tree(dict(state))
        rng = state.pop("rng_state", None)
        saved = state.get("parametrization")
        if saved is not None and saved != self.parametrization:
            raise ValueError(
                f"state_dict was saved with parametrization={saved!r}, this optimizer uses "
                f"{self.parametrization!r}"
            )
        if "weights" in state:
            _check_lam(state, self.parametrization, self.num_tasks)
        generator = self._generator
        if isinstance(rng, np.ndarray):  # an older checkpoint's torch.Generator state
            generator = _rng_from_torch_state(torch.from_numpy(rng.astype(np.uint8)))
        elif isinstance(rng, dict):
            generator = np.random.Generator(np.random.PCG64())
            try:
                generator.bit_generator.state = rng
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"MARIGOLD state_dict has an invalid PCG64 state: {exc}") from None
        elif rng is not None:
            raise ValueError(f"MARIGOLD state_dict has an invalid rng_state of type {type(rng)}")
        self.balancer_state = state
        self._generator = generator

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        shared_parameters: Iterable[Tensor] | None = None,
        closure: Closure | None = None,
    ) -> BalanceInfo:
        """One balanced backward pass; writes gradients into ``.grad`` (accumulating).

        Args:
            losses: K scalar tensors (a sequence, or a 1-D tensor of length K).
            representation: the balance point ``z`` (a tensor, or a tuple/list of blocks).
            shared_parameters: balance at the shared parameters instead (main use).
            closure: the extra forward of the ``"fd"`` estimator (ignored by the others),
                evaluated under ``torch.no_grad()`` on the SAME batch:

                * parameter level: a zero-argument callable that re-runs the model on the
                  batch and returns the K task losses (the shared parameters are temporarily
                  shifted when it is called), e.g. ``lambda: losses_of(model(x), ys)``;
                * representation level: a callable taking the (shifted) representation --
                  one argument with the same structure as ``representation`` (a tensor, or a
                  tuple/list of blocks) -- and returning the K task losses computed by the
                  heads from it, e.g. ``lambda z: [loss(h(z), y) for h, y in zip(heads, ys)]``.

                It must return K scalars (a sequence of scalar tensors/numbers, or a 1-D tensor
                of length K) in the order of ``losses``. The closure runs with the modules'
                training mode as is (except ``eval_mode_closure``), with the CPU (and CUDA)
                random-number state forked: every closure call of one step starts from the
                same RNG state, and the caller's RNG stream is left exactly as it was.

        Returns:
            a :class:`~mtl.BalanceInfo` with ``weights`` = the ``lam`` applied this step,
            ``gram=None`` and the estimate in ``extras``.
        """
        task_losses = self._check_losses(losses)
        if (representation is None) == (shared_parameters is None):
            raise ValueError(
                "pass exactly one of representation= and shared_parameters= "
                f"(got {'both' if representation is not None else 'neither'})"
            )
        # the closure runs under the caller's autocast (or, for a low-precision
        # representation computed under an autocast that has ended, under its dtype); the
        # step's own arithmetic runs outside autocast
        devices = {loss.device.type for loss in task_losses}
        blocks = [representation] if isinstance(representation, Tensor) else representation
        self._amp = forward_autocast(devices, list(blocks or []))
        with autocast_off(devices):
            return self._backward_marigold(task_losses, representation, shared_parameters, closure)

    def _backward_marigold(
        self,
        task_losses: list[Tensor],
        representation: Tensor | Sequence[Tensor] | None,
        shared_parameters: Iterable[Tensor] | None,
        closure: Closure | None,
    ) -> BalanceInfo:
        k = len(task_losses)
        self._open_window()
        self._init_state(k)
        # the losses stay on the device: they reach the host with everything else the step
        # needs, in ONE transfer, after the gradient and the closure (a non-finite loss is
        # decided there, before any .grad is written)
        values = torch.stack([loss.detach().to(torch.float64) for loss in task_losses])
        if representation is not None:
            level: Level = "representation"
            blocks = self._check_representation(representation)
            # one walk of the graph: the trunk check now, reachability and heads below
            analysis = analyse_graph(task_losses, blocks, self._managed())
            check_trunk(analysis)
            targets = blocks
        else:
            level = "parameters"
            targets = self._check_parameters(shared_parameters)  # type: ignore[arg-type]
        self._check_closure(closure, level, representation)
        if self.estimator == "gaussian" and level == "parameters" and self._group()[0]:
            raise NotImplementedError(
                "estimator='gaussian' at the parameter level is not supported under "
                "torch.distributed; use 'fd' or 'amortized', or representation="
            )
        if (
            self.estimator == "amortized"
            and level == "representation"
            and (self.normalize == "grad_norm")
        ):
            raise ValueError(
                "normalize='grad_norm' with estimator='amortized' needs the norm of the "
                "parameter gradient: pass shared_parameters=, or use normalize='max_abs'"
            )
        if level == "representation":
            check_reached(analysis.reaches, self._name)
            heads = self._split_heads(analysis) if self.estimator != "gaussian" else None
            return self._marigold_representation(
                task_losses, values, targets, heads, representation, closure
            )
        check_reached(depends_on(task_losses, targets), self._name, parameters=True)
        return self._marigold_parameters(task_losses, values, targets, closure)

    # -- checks
    def _check_closure(self, closure: Closure | None, level: Level, representation: Any) -> None:
        if self.estimator != "fd":
            return
        if closure is None:
            if level == "parameters":
                how = (
                    "at the parameter level pass a zero-argument callable that re-runs the model "
                    "on the same batch and returns the K task losses, e.g. "
                    "closure=lambda: [loss_fn(p, y) for p, y in zip(model(x).task_outputs, ys)]"
                )
            else:
                how = (
                    "at the representation level pass a callable that takes the (shifted) "
                    "representation and returns the K task losses computed by the heads, e.g. "
                    "closure=lambda z: [loss_fn(head(z), y) for head, y in zip(heads, ys)]"
                )
            raise ValueError(
                "estimator='fd' needs closure= to evaluate the task losses at a shifted point "
                f"(one extra forward on the same batch): {how}. Or use estimator='amortized' "
                "(no extra forward)."
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        try:
            sig = inspect.signature(closure)
        except (TypeError, ValueError):  # builtins without a signature: trust the caller
            return
        args: tuple[Any, ...] = () if level == "parameters" else (representation,)
        try:
            sig.bind(*args)
        except TypeError:
            if level == "parameters":
                raise TypeError(
                    "with shared_parameters= the closure is called with no argument (it re-runs "
                    f"the model on the same batch); got a closure with signature {sig}"
                ) from None
            raise TypeError(
                "with representation= the closure is called with one argument, the shifted "
                f"representation (same structure as representation=); got signature {sig}"
            ) from None

    def _closure_losses(self, out: Any, k: int, device: torch.device) -> Tensor:
        if isinstance(out, Tensor):
            if out.dim() != 1:
                raise ValueError(
                    "closure must return K scalar losses (a sequence or a 1-D tensor of length "
                    f"K={k}); got a tensor of shape {tuple(out.shape)}"
                )
            items: list[Any] = list(out.unbind(0))
        elif isinstance(out, (list, tuple)):
            items = list(out)
        else:
            raise TypeError(
                "closure must return K scalar losses (a sequence of scalar tensors or a 1-D "
                f"tensor); got {type(out).__name__}"
            )
        if len(items) != k:
            raise ValueError(
                f"closure returned {len(items)} losses, expected K={k} (one per task, in the "
                "order of the losses passed to backward)"
            )
        vals = []
        for i, v in enumerate(items):
            t = v.detach() if isinstance(v, Tensor) else torch.as_tensor(v)
            if t.numel() != 1:
                raise ValueError(
                    f"closure loss of {self._name(i)} must be a scalar, got shape {tuple(t.shape)}"
                )
            vals.append(t.reshape(()).to(device=device, dtype=torch.float64))
        return torch.stack(vals)

    # -- helpers
    def _state(self) -> dict[str, Any]:
        """The balancer state, its vectors as float64 NumPy arrays on the host.

        MARIGOLD keeps ``lam`` and its history on the host (the weight update is host math on the
        step's one transfer). A tensor put into ``balancer_state`` from outside (a user, an
        older pickled optimizer) is copied to the host here, once.
        """
        st = self.balancer_state
        for key in ("weights", "logits"):
            if isinstance(st.get(key), Tensor):
                st[key] = _host_vector(st[key])
        moves = st.get("moves")
        if moves and any(isinstance(v, Tensor) for m in moves for v in m.values()):
            st["moves"] = [_to_numpy_tree(m) for m in moves]
        prev = st.get("previous")
        if prev and any(isinstance(v, Tensor) for v in prev.values()):
            st["previous"] = _to_numpy_tree(prev)
        return st

    def _coefficients(self) -> list[float]:
        return [float(c) for c in self._state()["weights"]]

    def _lr(self) -> float:
        group = self.param_groups[0]
        return float(group["lr"]) if "lr" in group else 1.0

    def _heads(self, shared: list[Tensor]) -> list[Tensor]:
        ids = {id(p) for p in shared}
        return [
            p
            for g in self.param_groups
            for p in g["params"]
            if p.requires_grad and id(p) not in ids
        ]

    def _reduce_parts(self, parts: list[tuple[Tensor, int]]) -> list[Tensor]:
        """Sum several float64 tensors over the ranks in ONE all-reduce; divide part i by W**p_i."""
        active, group = self._group()
        if not active:
            return [t for t, _ in parts]
        world = dist.get_world_size(group)
        packed = torch.cat([t.reshape(-1).to(torch.float64) for t, _ in parts])
        dist.all_reduce(packed, group=group)
        out, offset = [], 0
        for t, power in parts:
            n = t.numel()
            out.append(packed[offset : offset + n].reshape(t.shape) / world**power)
            offset += n
        return out

    def _world(self) -> int:
        active, group = self._group()
        return dist.get_world_size(group) if active else 1

    def _evaluate(
        self,
        closure: Closure,
        k: int,
        device: torch.device,
        cuda: list[int],
        points: list[Callable[[], Any]],
    ) -> list[Tensor]:
        """Closure losses at each point (``points[j]()`` sets up point j and returns the
        closure's argument, or ``_NOARG``); every call starts from the same RNG state."""
        out = []
        with (
            _closure_scope(self.eval_mode_closure, cuda) as reset_rng,
            contextlib.ExitStack() as amp,
        ):
            for device_type, dtype in self._amp:
                amp.enter_context(torch.autocast(device_type=device_type, dtype=dtype))
            for setup in points:
                arg = setup()
                reset_rng()
                res = closure() if arg is _NOARG else closure(arg)
                out.append(self._closure_losses(res, k, device))
        return out

    def _gather(
        self, values: Tensor, raw: list[Tensor], scalars: list[Tensor], k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The step's ONE host transfer: the losses and the closure losses summed over the ranks
        (one all-reduce on the device), and ``scalars`` (squared norms, already global).

        Returns ``(loss sums (K,), closure loss sums (calls, K), scalars)``."""
        (summed,) = self._reduce_parts([(torch.cat([values, *raw]), 0)])
        host_sums, host_scalars, pending = to_host(
            summed, torch.stack(scalars), self._riders()
        )
        assert host_sums is not None and host_scalars is not None
        self._settle(pending)
        return host_sums[:k], host_sums[k:].reshape(-1, k), host_scalars

    def _fd_estimate(
        self, value_sums: np.ndarray, raw: np.ndarray, shift_sq: float, divisor: float
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``h`` from the host sums of the losses and the closure losses (``raw``: one row per
        call), with ``a = fd_step / sqrt(shift_sq)``; the estimate of the sums is divided by
        ``divisor`` (``W`` at the parameter level: the mean; ``W^2`` at the representation
        level). A squared norm at or below 1e-30 gives ``h = 0`` (no information)."""
        k = value_sums.shape[0]
        extras: dict[str, Any] = {"fd_step_size": None, "closure_calls": int(raw.shape[0])}
        if not shift_sq > _TINY:
            return np.zeros(k), extras
        a = self.fd_step / math.sqrt(shift_sq)
        extras["fd_step_size"] = a
        if self.fd_scheme == "forward":
            h = (value_sums - raw[0]) / a
        elif self.fd_scheme == "forward_closure":
            h = (raw[0] - raw[1]) / a
            world = self._world()
            extras["baseline_gap"] = torch.from_numpy((raw[0] - value_sums) / world)
        else:
            h = (raw[0] - raw[1]) / (2 * a)
        return (h / divisor if divisor != 1 else h), extras

    def _finish(
        self,
        values: np.ndarray,
        h: np.ndarray | None,
        grad_sq: float,
        extras: dict[str, Any],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Normalise and update lam (when there is an estimate), on the host. Returns the
        weights used for this step and the step's diagnostics (``BalanceInfo.extras``)."""
        st = self._state()
        used = st["weights"].copy()
        mode = self._normalization()
        h_norm = None
        if h is not None:
            h = np.array(h, dtype=np.float64)
            gsq: float | None = grad_sq
            at = used  # the weights whose M lam the estimate measures
            if self.estimator == "amortized":
                prev = st["previous"]
                at = prev["weights"]
                gsq = prev.get("grad_norm_sq")
                gsq = float("nan") if gsq is None else float(gsq)
            if self.step_control == "secant":
                self._control_step(h, at)
            h_norm = _normalize_np(h, mode, gsq if mode == "grad_norm" else None)
            new, logits = _step_np(
                used,
                h_norm,
                self.lr_weights * float(st["step_scale"]),
                self.parametrization,
                st.get("logits"),
            )
            if self.step_control == "secant":
                move = new - used
                q = float(h @ move)
                if q < 0 and float(np.abs(move).max()) > _MIN_MOVE:
                    # a descent move of F: remember it to measure the overshoot later
                    pending = [m for m in st["moves"] if not np.array_equal(m["to"], new)]
                    st["moves"] = [*pending, {"to": new.copy(), "move": move, "q": q}][-2:]
            st["weights"] = new
            if logits is not None:
                st["logits"] = logits
            st["num_updates"] = int(st.get("num_updates", 0)) + 1
        diagnostics = {
            "estimator": self.estimator,
            "h_hat": None if h is None else torch.from_numpy(h.copy()),
            "h_normalized": None if h_norm is None else torch.from_numpy(h_norm.copy()),
            "grad_norm_sq": grad_sq,
            "normalize": mode,
            "step_scale": float(st["step_scale"]),
            **extras,
            "next_weights": torch.from_numpy(st["weights"].copy()),
        }
        self.num_steps += 1
        if self.num_tasks is None:
            self.num_tasks = int(values.shape[0])
        return used, diagnostics

    def _control_step(self, h: np.ndarray, at: np.ndarray) -> None:
        """Secant step control [R]: after a move ``delta`` of lam taken with slope
        ``q = h_before . delta < 0``, the new estimate at the arrival point gives
        ``p = h_after . delta``; along the move F is quadratic, so the best multiple of that move
        was ``sigma* = q / (q - p)``. The scale ``s`` of ``lr_weights`` is multiplied by
        ``sigma*`` clipped to [1/2, 2], and ``s`` is kept in [min_step_scale, 1]: the rule only
        ever damps the plain step (an overshoot, ``p > 0``, shrinks it; an undershoot lets it
        grow back)."""
        st = self.balancer_state
        for i, m in enumerate(st["moves"]):
            if np.array_equal(m["to"], at):
                p, q = float(h @ m["move"]), float(m["q"])
                ratio = 2.0 if p <= q else q / (q - p)
                ratio = min(2.0, max(0.5, ratio))
                scale = float(st["step_scale"]) * ratio
                st["step_scale"] = min(1.0, max(self.min_step_scale, scale))
                st["moves"] = st["moves"][i + 1 :]
                return

    def _amortized_estimate(self, values: np.ndarray) -> np.ndarray | None:
        prev = self._state().get("previous")
        if not prev or float(prev["lr"]) <= 0:
            return None
        estimate: np.ndarray = (prev["losses"] - values) / float(prev["lr"])
        return estimate

    def _remember(self, values: np.ndarray, used: np.ndarray, grad_sq: float | None) -> None:
        if self.estimator == "amortized":
            self.balancer_state["previous"] = {
                "weights": used.copy(),
                "losses": np.array(values, dtype=np.float64),
                "lr": self._lr(),
                "grad_norm_sq": grad_sq,
            }

    def _result(
        self, level: Level, used: np.ndarray, values: np.ndarray, extras: dict[str, Any]
    ) -> BalanceInfo:
        self._close_window()  # the written gradients, read by step()
        return BalanceInfo(
            weights=torch.from_numpy(used.copy()),
            losses=torch.from_numpy(np.array(values, dtype=np.float64)),
            gram=None,
            level=level,
            extras=extras,
        )

    @staticmethod
    def _bad(values: np.ndarray) -> list[int]:
        return [i for i in range(values.shape[0]) if not math.isfinite(float(values[i]))]

    # -- parameter level
    def _marigold_parameters(
        self,
        losses: list[Tensor],
        values: Tensor,
        params: list[Tensor],
        closure: Closure | None,
    ) -> BalanceInfo:
        k = len(losses)
        lam = self._coefficients()
        heads = self._heads(params)
        perturbed: list[Tensor] = []
        u = None
        if self.estimator == "gaussian":  # F(lam + mu u_j): needs the graph, so before step 2
            u = self._directions(k)
            for j in range(self.num_perturbations):
                cs = [c + self.mu * float(x) for c, x in zip(lam, u[j])]
                gs = torch.autograd.grad(
                    weighted_sum(losses, cs), params, retain_graph=True, allow_unused=True
                )
                perturbed.append(0.5 * _sq_norm([g for g in gs if g is not None], values.device))
        stash = _stash_grads(params + heads)
        try:
            if self.weight_heads or not heads:
                torch.autograd.backward(weighted_sum(losses, lam), inputs=params + heads)
            else:
                torch.autograd.backward(weighted_sum(losses, lam), inputs=params, retain_graph=True)
                torch.autograd.backward(weighted_sum(losses, None), inputs=heads)
            # read after BOTH calls: under DDP the averaged (global) g_lam is final only then,
            # and it is identical on every rank (so are the checks below)
            fresh = [p.grad for p in params]
            grad_sq_dev = _sq_norm([g for g in fresh if g is not None], values.device)
            raw: list[Tensor] = []
            if self.estimator == "fd":
                assert closure is not None
                raw = self._fd_parameters(closure, values, params, fresh, grad_sq_dev, k)
            # every rank shifted by the same global g: the losses' and the closure losses' sums
            # (one all-reduce), then the step's ONE host transfer
            value_sums, raw_sums, scalars = self._gather(values, raw, [grad_sq_dev, *perturbed], k)
        except BaseException:
            _unstash_grads(stash, keep_new=False)
            raise
        world = self._world()
        host_values = value_sums / world
        grad_sq = float(scalars[0])
        bad = self._bad(host_values)
        if bad:
            _unstash_grads(stash, keep_new=False)
            return self._nonfinite("parameters", host_values, "loss", bad)
        if not math.isfinite(grad_sq) or not np.isfinite(scalars[1:]).all():
            _unstash_grads(stash, keep_new=False)
            return self._nonfinite("parameters", host_values, "gradient", self._support())
        extras: dict[str, Any] = {"fd_step_size": None, "closure_calls": 0}
        h: np.ndarray | None = None
        if self.estimator == "fd":
            h, extras = self._fd_estimate(value_sums, raw_sums, grad_sq, world)
        elif self.estimator == "gaussian":
            assert u is not None
            h = self._gaussian_from_values(u, scalars[1:], 0.5 * grad_sq)
        if h is not None and not np.isfinite(h).all():
            _unstash_grads(stash, keep_new=False)
            return self._nonfinite(
                "parameters", host_values, "loss at the shifted parameters", self._bad(h)
            )
        _unstash_grads(stash, keep_new=True)
        if self.estimator == "amortized":
            h = self._amortized_estimate(host_values)
        used, diagnostics = self._finish(host_values, h, grad_sq, extras)
        self._remember(host_values, used, grad_sq)
        return self._result("parameters", used, host_values, diagnostics)

    def _fd_parameters(
        self,
        closure: Closure,
        values: Tensor,
        params: list[Tensor],
        grads: list[Tensor | None],
        grad_sq: Tensor,
        k: int,
    ) -> list[Tensor]:
        """The closure losses at the shifted parameters (one row per call, on the device). The
        shift ``a g`` with ``a = fd_step / |g|`` is computed on the device (``a = 0`` for a
        gradient too small to carry information: the closure then sees theta itself and its
        result is not used)."""
        a = _shift_size(grad_sq, self.fd_step)
        shifts = [_Shift(p, g, a) for p, g in zip(params, grads) if g is not None]
        cuda = _cuda_indices(params)

        def at(sign: float) -> Callable[[], Any]:
            def setup() -> Any:
                for s in shifts:
                    s.apply(sign)
                return _NOARG

            return setup

        try:
            return self._evaluate(closure, k, values.device, cuda, self._points(at))
        finally:
            for s in shifts:
                s.restore()

    def _points(self, at: Callable[[float], Callable[[], Any]]) -> list[Callable[[], Any]]:
        if self.fd_scheme == "forward":
            return [at(-1.0)]
        if self.fd_scheme == "forward_closure":
            return [at(0.0), at(-1.0)]
        return [at(1.0), at(-1.0)]

    # -- representation level
    def _marigold_representation(
        self,
        losses: list[Tensor],
        values: Tensor,
        blocks: list[Tensor],
        heads: list[list[Tensor]] | None,
        representation: Any,
        closure: Closure | None,
    ) -> BalanceInfo:
        k = len(losses)
        lam = self._coefficients()
        # heads disjoint from the trunk: the heads' gradients come with g_z and the final
        # backward runs through the trunk only (the heads are traversed once, as in a plain step)
        if heads is None:
            gs = torch.autograd.grad(
                weighted_sum(losses, lam), blocks, retain_graph=True, allow_unused=True
            )
            gz = [torch.zeros_like(z) if g is None else g for z, g in zip(blocks, gs)]
            head_grads: list[tuple[Tensor | None, ...]] = []
        else:
            gz, head_grads = self._gradients_with_heads(losses, blocks, heads, lam)
        local_sq = _sq_norm(gz, values.device)
        perturbed: list[Tensor] = []
        u = None
        if self.estimator == "gaussian":
            u = self._directions(k)
            for j in range(self.num_perturbations):
                cs = [c + self.mu * float(x) for c, x in zip(lam, u[j])]
                gj = torch.autograd.grad(
                    weighted_sum(losses, cs), blocks, retain_graph=True, allow_unused=True
                )
                perturbed.append(0.5 * _sq_norm([g for g in gj if g is not None], values.device))
        # Under DDP the ranks hold disjoint rows of the global Z: |g_z|^2 of the global batch is
        # sum_r |g_z,r|^2 / W^2, and the single-process shift of rank r's rows is
        # fd_step * g_z,r / sqrt(sum_r |g_z,r|^2). One all-reduce (sum) before the closure, on
        # the device: the shift is computed there, nothing is read back before the closure.
        (summed,) = self._reduce_parts([(torch.stack([local_sq, *perturbed]), 0)])
        raw: list[Tensor] = []
        if self.estimator == "fd":
            assert closure is not None
            raw = self._fd_representation(closure, values, blocks, gz, summed[0], k, representation)
        value_sums, raw_sums, scalars = self._gather(values, raw, [summed], k)
        scalars = scalars.reshape(-1)
        world = self._world()
        host_values = value_sums / world
        bad = self._bad(host_values)
        if bad:
            return self._nonfinite("representation", host_values, "loss", bad)
        shift_sq = float(scalars[0])
        grad_sq = shift_sq / world**2
        if not np.isfinite(scalars).all():
            return self._nonfinite("representation", host_values, "gradient", self._support())
        extras: dict[str, Any] = {"fd_step_size": None, "closure_calls": 0}
        h: np.ndarray | None = None
        # representation-level Gram convention under DDP: sum_r / W^2
        if self.estimator == "fd":
            h, extras = self._fd_estimate(value_sums, raw_sums, shift_sq, world**2)
        elif self.estimator == "gaussian":
            assert u is not None
            h = self._gaussian_from_values(u, scalars[1:] / world**2, 0.5 * grad_sq)
        if h is not None and not np.isfinite(h).all():  # NaN on any rank reaches every rank
            return self._nonfinite(
                "representation", host_values, "loss at the shifted representation", self._bad(h)
            )
        coef = lam if self.weight_heads else None
        if heads is not None:
            torch.autograd.backward(blocks, grad_tensors=gz)  # the trunk only
            accumulate_head_grads(heads, head_grads, coef)
        else:
            # the model's gradient: ONE backward; z's incoming gradient is replaced by g_z
            handles = [register_grad_hook(z, replace_grad(g)) for z, g in zip(blocks, gz)]
            try:
                torch.autograd.backward(weighted_sum(losses, coef))
            finally:
                for hd in handles:
                    hd.remove()
        if self.estimator == "amortized":
            h = self._amortized_estimate(host_values)
        used, diagnostics = self._finish(host_values, h, grad_sq, extras)
        self._remember(host_values, used, None)
        return self._result("representation", used, host_values, diagnostics)

    def _gradients_with_heads(
        self,
        losses: list[Tensor],
        blocks: list[Tensor],
        heads: list[list[Tensor]],
        lam: list[float],
    ) -> tuple[list[Tensor], list[tuple[Tensor | None, ...]]]:
        """``g_z = d(sum_k lam_k L_k)/dz`` and each task's head gradients ``dL_k/dheads[k]``,
        from one pass per task that stops at the representation (the heads' total work is one
        traversal, as in a plain backward); ``g_z`` accumulated as the passes come in, so no K
        per-task gradients are held (unlike the Gram methods' ``_task_representation_grads``,
        whose row matrix MARIGOLD does not need: its memory stays that of one gradient)."""
        n = len(blocks)
        gz = [torch.zeros_like(z) for z in blocks]
        head_grads: list[tuple[Tensor | None, ...]] = []
        for loss, c, params in zip(losses, lam, heads):
            gs = torch.autograd.grad(loss, [*blocks, *params], retain_graph=True, allow_unused=True)
            for acc, g in zip(gz, gs[:n]):
                if g is not None and c != 0.0:
                    acc.add_(g, alpha=c)
            head_grads.append(gs[n:])
        return gz, head_grads

    def _fd_representation(
        self,
        closure: Closure,
        values: Tensor,
        blocks: list[Tensor],
        gz: list[Tensor],
        shift_sq: Tensor,
        k: int,
        representation: Any,
    ) -> list[Tensor]:
        """The closure losses at the shifted representation (one row per call, on the device).
        ``shift_sq``: ``|g_z|^2`` summed over the ranks (the local one without DDP), a 0-d
        device tensor; the shift ``a g_z``, ``a = fd_step / sqrt(shift_sq)``, is computed on the
        device (``a = 0`` below 1e-30: the closure then sees z itself, its result unused)."""
        a = _shift_size(shift_sq, self.fd_step)
        base_z = [z.detach() for z in blocks]
        scaled = [a.to(device=g.device, dtype=g.dtype) * g for g in gz]
        cuda = _cuda_indices(blocks)

        def at(sign: float) -> Callable[[], Any]:
            def setup() -> Any:
                shifted = [
                    z.add(ag, alpha=sign) if sign != 0.0 else z for z, ag in zip(base_z, scaled)
                ]
                if isinstance(representation, Tensor):
                    return shifted[0]
                return type(representation)(shifted)

            return setup

        return self._evaluate(closure, k, values.device, cuda, self._points(at))

    # -- gaussian
    def _directions(self, k: int) -> np.ndarray:
        u: np.ndarray = self._generator.standard_normal((self.num_perturbations, k))
        centred: np.ndarray = u - u.mean(1, keepdims=True)
        return centred

    def _gaussian_from_values(self, u: np.ndarray, perturbed: np.ndarray, f0: float) -> np.ndarray:
        est = np.zeros(u.shape[1])
        for j, fj in enumerate(perturbed):
            est += (float(fj) - f0) / self.mu * u[j]
        return est / len(perturbed)

    def _support(self) -> list[int]:
        lam = self._state()["weights"]
        return [i for i in range(lam.shape[0]) if float(lam[i]) > 0]


# ---------------------------------------------------------------------- helpers
class _NoArg:
    pass


_NOARG = _NoArg()


def _check_lam(state: dict[str, Any], parametrization: str, num_tasks: int | None) -> None:
    """A saved lam must lie on its domain: finite, on the simplex (both parametrizations), of
    K entries, and for ``"softmax"`` equal to the softmax of finite saved logits."""
    lam = np.asarray(state["weights"], dtype=np.float64)
    k = num_tasks if num_tasks is not None else lam.shape[0] if lam.ndim == 1 else -1
    if lam.ndim != 1 or lam.shape[0] != k:
        raise ValueError(f"MARIGOLD state_dict: 'weights' must have shape ({k},), got {lam.shape}")
    if not np.isfinite(lam).all() or (lam < 0).any() or abs(lam.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"MARIGOLD state_dict: 'weights' must lie on the simplex (finite, >= 0, sum 1), "
            f"got {lam.tolist()}"
        )
    if parametrization == "softmax":
        logits = np.asarray(state.get("logits"), dtype=np.float64)
        if logits.shape != lam.shape or not np.isfinite(logits).all():
            raise ValueError(
                f"MARIGOLD state_dict: 'logits' must be {k} finite numbers, got {logits.tolist()}"
            )
        soft = np.exp(logits - logits.max())
        if np.abs(soft / soft.sum() - lam).max() > 1e-6:
            raise ValueError("MARIGOLD state_dict: 'weights' is not the softmax of 'logits'")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_number(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    ok = math.isfinite(number) and (number >= 0 if allow_zero else number > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
    return number


def _check_modules(modules: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if modules is None:
        return []
    if isinstance(modules, nn.Module):
        return [modules]
    if isinstance(modules, (list, tuple)):
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"eval_mode_closure[{i}] is a {type(m).__name__}, not an nn.Module")
        return list(modules)
    raise TypeError(
        f"eval_mode_closure must be an nn.Module or a sequence of them, got {type(modules).__name__}"
    )


def _sq_norm(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """``sum |t|^2`` as a 0-d float64 tensor on ``device``, never read back (sparse tensors:
    their coalesced values), with :func:`mtl._gram.rescaled_gram` (float32 chunk products after
    an exact power-of-two scaling, so no float32 over- or underflow; no float64 copy)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel():
            total = total + rescaled_gram(t.detach().reshape(1, -1))[0, 0].to(device)
    return total


def _shift_size(sq: Tensor, fd_step: float) -> Tensor:
    """``a = fd_step / sqrt(sq)`` on the device (0-d float64); 0 when ``sq`` is at or below
    1e-30 or not finite (no information: the host discards that closure result)."""
    ok = (sq > _TINY) & torch.isfinite(sq)
    return torch.where(ok, fd_step / torch.sqrt(torch.where(ok, sq, torch.ones_like(sq))), 0.0)


def _host_vector(t: Tensor) -> np.ndarray:
    """A state tensor put in from outside, as a writable float64 host array (one copy)."""
    return np.array(host_array(t, np.float64), dtype=np.float64)


def _to_numpy_tree(obj: Any) -> Any:
    """Tensors (the checkpoint's float64 vectors) in nested dicts/lists as host arrays."""
    if isinstance(obj, Tensor):
        return _host_vector(obj) if obj.is_floating_point() else host_array(obj, None).copy()
    if isinstance(obj, dict):
        return {key: _to_numpy_tree(v) for key, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy_tree(v) for v in obj]
    return obj


def _to_torch_tree(obj: Any) -> Any:
    """Host arrays in nested dicts/lists as CPU tensors (copies)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {key: _to_torch_tree(v) for key, v in obj.items()}
    if isinstance(obj, list):
        return [_to_torch_tree(v) for v in obj]
    return obj


def _normalize_np(h: np.ndarray, mode: str, grad_norm_sq: float | None) -> np.ndarray:
    """:func:`normalize_estimate` on the host."""
    if mode == "none":
        return h.copy()
    if mode == "max_abs":
        scale = float(np.abs(h).max()) if h.size else 0.0
    elif mode == "grad_norm":
        if grad_norm_sq is None:
            raise ValueError("normalize='grad_norm' needs grad_norm_sq = |g_lam|^2")
        scale = float(grad_norm_sq)
    else:
        raise ValueError(f"normalize must be one of {_NORMALIZE[1:]}, got {mode!r}")
    if not math.isfinite(scale) or scale <= _TINY:
        return np.zeros_like(h)
    return h / scale


def _step_np(
    lam: np.ndarray, n: np.ndarray, lr: float, parametrization: str, logits: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`marigold_step` on the host."""
    if parametrization == "simplex":
        return _project_simplex_np(lam - lr * n), None
    if logits is None:
        raise ValueError("parametrization='softmax' needs the current logits")
    xi = logits - lr * lam * (n - float(lam @ n))
    e = np.exp(xi - xi.max())
    return e / e.sum(), xi


def _stash_grads(params: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
    """Move the existing ``.grad`` of ``params`` aside so the next backward writes g_lam alone."""
    stash = [(p, p.grad) for p in params]
    for p in params:
        p.grad = None
    return stash


def _unstash_grads(stash: list[tuple[Tensor, Tensor | None]], *, keep_new: bool) -> None:
    """Put the stashed gradients back, adding the new ones (``keep_new``) or dropping them."""
    for p, old in stash:
        new = p.grad if keep_new else None
        if old is None:
            p.grad = new
        elif new is None:
            p.grad = old
        else:
            p.grad = old + new if old.is_sparse else old.add_(new)


class _Shift:
    """Shift a parameter in place along ``-scale * g`` and restore it bit-exactly from a copy.

    Dense gradients: the whole tensor is saved. Sparse gradients with one sparse dimension
    (``nn.Embedding(sparse=True)``): only the touched rows are saved and shifted.
    """

    def __init__(self, p: Tensor, g: Tensor, a: Tensor) -> None:
        self.p = p
        self.data = p.data
        self.a = a.to(device=p.device, dtype=p.dtype)  # the step size, a 0-d device tensor
        if g.is_sparse and g.sparse_dim() == 1:
            g = g.coalesce()
            self.index: Tensor | None = g.indices()[0]
            self.g = g.values().to(p.dtype)
            self.saved = self.data.index_select(0, self.index).clone()
        else:
            self.index = None
            self.g = (g.to_dense() if g.is_sparse else g).to(p.dtype)
            self.saved = self.data.clone()
        self.shifted = False

    def apply(self, sign: float) -> None:
        """Move to ``theta + sign * a * g`` (``sign`` in {-1, 0, 1}; 0: theta itself)."""
        if self.shifted:
            self._copy_back()
        if sign != 0.0:
            if self.index is None:
                self.data.addcmul_(self.g, self.a, value=sign)
            else:
                self.data.index_add_(0, self.index, self.g * self.a, alpha=sign)
            self.shifted = True

    def _copy_back(self) -> None:
        if self.index is None:
            self.data.copy_(self.saved)
        else:
            self.data.index_copy_(0, self.index, self.saved)
        self.shifted = False

    def restore(self) -> None:
        if self.shifted:
            self._copy_back()


def _cuda_indices(tensors: Sequence[Tensor]) -> list[int]:
    idx = set()
    for t in tensors:
        if t.device.type == "cuda":
            idx.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return sorted(idx)


@contextmanager
def _closure_scope(modules: list[nn.Module], cuda: list[int]) -> Iterator[Callable[[], None]]:
    """``no_grad``, given modules in eval mode, RNG forked; yields a function that resets the RNG
    to its state at entry (so every closure call sees the same random draws)."""
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda]

        def reset() -> None:
            torch.set_rng_state(cpu_state)
            for d, s in zip(cuda, cuda_states):
                torch.cuda.set_rng_state(s, d)

        try:
            for mod in modules:
                mod.eval()
            yield reset
        finally:
            for m, f in flags:
                m.training = f
