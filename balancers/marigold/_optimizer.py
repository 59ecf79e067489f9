"""The ``MARIGOLD`` optimizer class [R]: its options, its state hooks and one ``backward``.

The class ties the package together: the math is in :mod:`._functional`, one step at each level
in :mod:`._levels`, the closure plumbing in :mod:`._closure`, the checks of the options and of a
call's arguments in :mod:`._validation`, the state and its checkpoint in :mod:`._state`, and the
host half of a step (estimate, weight update, diagnostics) in :mod:`._update`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from mtl import BalancedOptimizer, BalanceInfo, depends_on
from mtl._autocast import autocast_off, forward_autocast
from mtl._checks import check_closure_losses, check_reached, check_trunk
from mtl._graph import analyse_graph
from mtl._window import step_transfer

from .._rerun import replay_autocast
from .._rng import pcg64
from ._closure import _NOARG, _closure_scope
from ._functional import (
    DEFAULT_FD_STEP,
    DEFAULT_LR_WEIGHTS,
    Closure,
    Estimator,
    FDScheme,
    Level,
    Normalize,
    Parametrization,
    StepControl,
    gaussian_estimate_np,
)
from ._levels import marigold_parameters, marigold_representation
from ._state import balancer_state_dict, host_state, init_state, load_balancer_state
from ._validation import (
    check_closure,
    check_eval_modules,
    check_integers,
    check_level,
    check_modes,
    check_sizes,
    refuse_compute_gram,
)

__all__ = ["MARIGOLD"]


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
        refuse_compute_gram(kwargs)
        check_modes(estimator, parametrization, normalize, fd_scheme, step_control)
        min_step_scale, lr_weights, fd_step, mu = check_sizes(
            min_step_scale, lr_weights, fd_step, mu
        )
        check_integers(num_perturbations, seed)
        modules = check_eval_modules(eval_mode_closure, fd_scheme)
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
        self._generator = pcg64(seed)
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

    def _init_state(self, k: int) -> None:
        init_state(self.balancer_state, k, self.parametrization)

    def reset_state(self) -> None:
        """Forget the learned weights (back to uniform) and the amortized history."""
        self.balancer_state = {}
        self._generator = pcg64(self.seed)
        if self.num_tasks is not None:
            self._init_state(self.num_tasks)

    def _balancer_state_dict(self) -> dict[str, Any]:
        return balancer_state_dict(self)

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Checks everything first (parametrization, lam on its domain, the generator), then
        replaces the state: a rejected state leaves the optimizer as it was."""
        load_balancer_state(self, state)

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
        check_closure(closure, self.estimator, level)
        check_level(self, level)
        if level == "representation":
            check_reached(analysis.reaches, self._name)
            heads = self._split_heads(analysis) if self.estimator != "gaussian" else None
            return marigold_representation(
                self, task_losses, values, targets, heads, representation, closure
            )
        check_reached(depends_on(task_losses, targets), self._name, parameters=True)
        return marigold_parameters(self, task_losses, values, targets, closure)

    # -- checks
    def _closure_losses(self, out: Any, k: int, device: torch.device) -> Tensor:
        return check_closure_losses(out, k, device, self._name, who="closure")

    # -- helpers
    def _state(self) -> dict[str, Any]:
        """The balancer state, its vectors as float64 NumPy arrays on the host (see
        :func:`._state.host_state`)."""
        return host_state(self.balancer_state)

    def _coefficients(self) -> list[float]:
        return [float(c) for c in self._state()["weights"]]

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
            replay_autocast(self._amp),
        ):
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
        host_sums, host_scalars = step_transfer(self, summed, torch.stack(scalars))
        assert host_sums is not None and host_scalars is not None
        return host_sums[:k], host_sums[k:].reshape(-1, k), host_scalars

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
    # -- representation level
    # -- gaussian
    def _directions(self, k: int) -> np.ndarray:
        u: np.ndarray = self._generator.standard_normal((self.num_perturbations, k))
        centred: np.ndarray = u - u.mean(1, keepdims=True)
        return centred

    def _gaussian_from_values(self, u: np.ndarray, perturbed: np.ndarray, f0: float) -> np.ndarray:
        return gaussian_estimate_np(u, perturbed, f0, self.mu)

    def _support(self) -> list[int]:
        lam = self._state()["weights"]
        return [i for i in range(lam.shape[0]) if float(lam[i]) > 0]
