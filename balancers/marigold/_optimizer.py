"""The ``MARIGOLD`` optimizer class [R] (the math: :mod:`._functional`; one step: :mod:`._levels`)."""

from __future__ import annotations

import contextlib
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
from mtl._checks import (
    check_closure_losses,
    check_reached,
    check_trunk,
    closure_arity_mismatch,
)
from mtl._graph import analyse_graph
from mtl._window import step_transfer

from .._options import check_choice, check_positive
from .._rng import pcg64, rng_from_state, rng_from_torch_state
from ._closure import (
    _NOARG,
    _check_modules,
    _closure_scope,
)
from ._functional import (
    _ESTIMATORS,
    _FD_SCHEMES,
    _MIN_MOVE,
    _NORMALIZE,
    _PARAMETRIZATIONS,
    _STEP_CONTROLS,
    _TINY,
    DEFAULT_FD_STEP,
    DEFAULT_LR_WEIGHTS,
    Closure,
    Estimator,
    FDScheme,
    Level,
    Normalize,
    Parametrization,
    StepControl,
    _check_lam,
    _host_vector,
    _normalize_np,
    _step_np,
    _to_numpy_tree,
    _to_torch_tree,
    gaussian_estimate_np,
)
from ._levels import marigold_parameters, marigold_representation

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
        if kwargs.get("compute_gram"):
            raise ValueError(
                "MARIGOLD never computes per-task gradients, so compute_gram=True is not "
                "supported (use MGDA for Gram diagnostics)"
            )
        kwargs.pop("compute_gram", None)
        check_choice("estimator", estimator, _ESTIMATORS)
        check_choice("parametrization", parametrization, _PARAMETRIZATIONS)
        check_choice("normalize", normalize, _NORMALIZE)
        check_choice("fd_scheme", fd_scheme, _FD_SCHEMES)
        check_choice("step_control", step_control, _STEP_CONTROLS)
        min_step_scale = check_positive("min_step_scale", min_step_scale)
        if min_step_scale > 1:
            raise ValueError(f"min_step_scale must be in (0, 1], got {min_step_scale}")
        lr_weights = check_positive("lr_weights", lr_weights, allow_zero=True)
        fd_step = check_positive("fd_step", fd_step)
        mu = check_positive("mu", mu)
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
        self._generator = pcg64(self.seed)
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
            generator = rng_from_torch_state(torch.from_numpy(rng.astype(np.uint8)), "MARIGOLD")
        elif rng is not None:
            generator = rng_from_state(rng, "MARIGOLD")
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
        self._check_closure(closure, level)
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
            return marigold_representation(
                self, task_losses, values, targets, heads, representation, closure
            )
        check_reached(depends_on(task_losses, targets), self._name, parameters=True)
        return marigold_parameters(self, task_losses, values, targets, closure)

    # -- checks
    def _check_closure(self, closure: Closure | None, level: Level) -> None:
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
        sig = closure_arity_mismatch(closure, 0 if level == "parameters" else 1)
        if sig is None:
            return
        if level == "parameters":
            raise TypeError(
                "with shared_parameters= the closure is called with no argument (it re-runs "
                f"the model on the same batch); got a closure with signature {sig}"
            )
        raise TypeError(
            "with representation= the closure is called with one argument, the shifted "
            f"representation (same structure as representation=); got signature {sig}"
        )

    def _closure_losses(self, out: Any, k: int, device: torch.device) -> Tensor:
        return check_closure_losses(out, k, device, self._name, who="closure")

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
        host_sums, host_scalars = step_transfer(self, summed, torch.stack(scalars))
        assert host_sums is not None and host_scalars is not None
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
