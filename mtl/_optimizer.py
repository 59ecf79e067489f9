"""``BalancedOptimizer``: a ``torch.optim.Optimizer`` wrapper that balances task gradients.

One training step (see DESIGN.md, "One training step")::

    x --trunk--> z (balance point) --heads--> L_1 .. L_K
    representation level:  h_k = dL_k/dz through the heads only (K cheap backward passes)
    parameter level:       g_k = dL_k/d(theta_shared) (K backward passes)
    Gram M_ij = <h_i, h_j> (float64)  -->  balancer  -->  coefficients c in R^K
    representation level:  ONE ordinary backward in which z's incoming gradient is replaced by
                           sum_k c_k h_k (the trunk gets exactly grad of sum_k c_k L_k)
    parameter level:       sum_k c_k g_k into the shared parameters' .grad
    heads: their own task's gradient (unweighted unless ``weight_heads=True``)
    inner optimizer step

Subclasses implement :meth:`BalancedOptimizer._compute_weights`, a function of the Gram matrix
and the losses; the plumbing lives here once.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ._autocast import autocast_off
from ._checks import (
    check_losses,
    check_parameters,
    check_reached,
    check_representation,
    check_trunk,
)
from ._combine import accumulate_head_grads, register_grad_hook, replace_grad, sum_backward
from ._finite import nonfinite_flags
from ._gram import combine_rows, device_gram, rescaled_gram, suspect_rows, task_rows
from ._graph import GraphAnalysis, analyse_graph, depends_on
from ._host import to_device, to_host
from ._info import BalanceInfo, NonFiniteError

__all__ = ["BalancedOptimizer"]

#: what ``_compute_weights`` returns: ``(weights, extras)`` (or, for older subclasses, bare weights)
WeightsResult: TypeAlias = "tuple[np.ndarray, Mapping[str, Any]] | np.ndarray"

_NONFINITE_MODES = ("raise", "skip")
_BALANCER_KEYS = ("method", "num_tasks", "num_steps", "num_skipped", "state")
_GRAD_MODES = ("loop", "batched")
_PARAM_UPDATES = ("auto", "direct", "backward")


class BalancedOptimizer(Optimizer):
    """Wrap any ``torch.optim.Optimizer`` and balance the task gradients on the shared part.

    The wrapper is itself an ``Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` ARE
    the inner optimizer's (forwarded, never copied), so LR schedulers, ``torch.amp.GradScaler``,
    ``clip_grad_norm_`` and gradient accumulation work unchanged.

    This base class applies fixed coefficients of one (the plain sum); subclasses override
    :meth:`_compute_weights`.

    Args:
        optimizer: the inner optimizer, over all model parameters (trunk and heads).
        num_tasks: K; inferred from the first call to :meth:`backward` when ``None``.
        task_names: names used in error messages and diagnostics (default ``task 0`` ...).
        weight_heads: when ``True`` the heads receive ``c_k * grad L_k`` too; by default
            (``False``) each head receives its own task's unweighted gradient.
        on_nonfinite: ``"raise"`` (default): a NaN/inf loss or gradient raises
            :class:`~mtl.NonFiniteError` naming the task; ``"skip"``: no gradient is written, the
            balancer state is left untouched, the next :meth:`step` is skipped and
            ``num_skipped`` is incremented.
        grad_mode: how the K representation gradients are computed: ``"loop"`` (default, K
            ``autograd.grad`` calls through the heads; fastest on CPU) or ``"batched"`` (one
            vmapped call with ``is_grads_batched=True``).
        process_group: under ``torch.distributed`` with more than one rank, the Gram matrix and
            the losses are all-reduced so every rank computes identical coefficients.
            ``"auto"`` (default) uses the default group when one is initialized; ``None``
            turns the reduction off; or pass a ``ProcessGroup``.
        compute_gram: force the Gram matrix to be computed (for diagnostics) by methods that do
            not need it. ``None`` = the method's default.
        parameter_update: how the combined gradient reaches the shared parameters at parameter
            level: ``"direct"`` accumulates ``sum_k c_k g_k`` into ``.grad`` and back-propagates
            the heads only (fastest); ``"backward"`` runs one full backward of ``sum_k L_k`` in
            which tensor hooks on the shared parameters replace their gradient by
            ``sum_k c_k g_k``, so DDP's gradient averaging sees it; ``"auto"`` (default) picks
            ``"backward"`` under ``torch.distributed`` with more than one rank, else ``"direct"``.
    """

    #: whether the method needs per-task gradients and their Gram matrix.
    requires_gram: ClassVar[bool] = True
    #: whether the method computes one set of weights per block (representation tensor or
    #: shared parameter tensor) rather than one for the whole shared part.
    per_block: ClassVar[bool] = False
    #: whether ``backward`` takes a ``closure`` that re-evaluates the losses (MARIGOLD, FAMO):
    #: training loops pass one when this is set, instead of inspecting the signature.
    needs_closure: ClassVar[bool] = False
    #: whether the constructor takes a ``seed`` (methods that draw random numbers).
    accepts_seed: ClassVar[bool] = False
    #: ``False`` for loss-level methods (UW, DWA, RLW, GLS, FAMO): their weights are a function
    #: of the losses and their own state only, so a step is ONE weighted backward of
    #: ``sum_k c_k L_k`` (heads included, as in their papers) after the losses reach the host;
    #: no per-task gradient is computed (unless ``compute_gram`` asks for diagnostics).
    uses_gradients: ClassVar[bool] = True

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        weight_heads: bool = False,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        grad_mode: Literal["loop", "batched"] = "loop",
        process_group: Any = "auto",
        compute_gram: bool | None = None,
        parameter_update: Literal["auto", "direct", "backward"] = "auto",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, BalancedOptimizer):
            raise TypeError("optimizer is already a BalancedOptimizer; wrap the inner optimizer")
        if num_tasks is not None:
            if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
                raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if task_names is not None:
            task_names = [str(n) for n in task_names]
            if num_tasks is None:
                num_tasks = len(task_names)
            elif len(task_names) != num_tasks:
                raise ValueError(
                    f"task_names has {len(task_names)} names but num_tasks={num_tasks}"
                )
        if on_nonfinite not in _NONFINITE_MODES:
            raise ValueError(
                f"on_nonfinite must be one of {_NONFINITE_MODES}, got {on_nonfinite!r}"
            )
        if grad_mode not in _GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")
        if parameter_update not in _PARAM_UPDATES:
            raise ValueError(
                f"parameter_update must be one of {_PARAM_UPDATES}, got {parameter_update!r}"
            )

        self.optimizer = optimizer
        self.num_tasks: int | None = num_tasks
        self.task_names: list[str] | None = task_names
        self.weight_heads = bool(weight_heads)
        self.on_nonfinite = on_nonfinite
        self.grad_mode = grad_mode
        self.process_group = process_group
        # a method that needs the Gram matrix always receives one; compute_gram only adds it
        self.compute_gram = self.requires_gram or bool(compute_gram)
        self.parameter_update = parameter_update
        #: balancer state saved by state_dict (moving averages, weights...); subclasses fill it.
        self.balancer_state: dict[str, Any] = {}
        self.num_steps = 0  # balanced backward passes that updated the balancer
        self.num_skipped = 0  # steps skipped because of a non-finite loss or gradient
        self._skip_next_step = False
        self._window: _Window | None = None  # what step() must check before stepping
        # a window whose step a fused inner optimizer took with the flags on the device: its
        # verdict reaches the host with the next transfer (or at state_dict())
        self._unsettled: _Window | None = None
        self._rider_layout: tuple[bool, int] = (False, 0)  # what _riders() packed
        self._rows_cache: tuple[list[Any], list[Tensor]] | None = None

        # param_groups/state/defaults are forwarded to the inner optimizer (properties below)
        init_optimizer_hooks(self)

    # ------------------------------------------------------------------ forwarding
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # A new accumulation window: a skip pending from a discarded window (the caller saw
        # info.skipped and moved on without step()) must not swallow the next good step.
        self._skip_next_step = False
        self._window = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Step the inner optimizer, unless the last balanced backward was skipped.

        Gradients written after a balanced backward's host transfer (the trunk below the
        balance point, the heads, the combined shared gradient) were reduced on the device to
        one flag per parameter; like ``torch.amp.GradScaler.step``, this reads that vector once.
        A non-finite one rolls the balancer state back to before the window's first backward
        and then raises :class:`NonFiniteError` (``.grad`` that were ``None`` before are
        ``None`` again) or, with ``on_nonfinite="skip"``, skips the step.

        A fused inner optimizer (``torch.optim.Adam/AdamW/SGD(..., fused=True)``) takes the
        flag on the device instead and skips there, as under ``GradScaler``: no read here, so
        the whole step makes ONE host synchronization. The balancer's rollback (and the raise,
        with ``on_nonfinite="raise"``) then happens in the next ``backward``, from its
        transfer, or in :meth:`state_dict`.
        """
        window, self._window = self._window, None
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        if window is not None and window.flags is not None:
            if getattr(self.optimizer, "_step_supports_amp_scaling", False):
                return self._fused_step(window, closure)
            bad = to_host(window.flags)[0]
            assert bad is not None
            if bad.any():
                self._reject(window, [p for p, b in zip(window.params, bad) if b])
                return None
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def _fused_step(self, window: _Window, closure: Callable[[], float] | None) -> Any:
        """The inner step with ``found_inf`` on the device (the fused kernels skip the update
        and keep their step counts when it is non-zero); the verdict is settled later."""
        assert window.flags is not None
        found_inf = window.flags.amax().to(torch.float32)
        inner: Any = self.optimizer
        inner.found_inf, inner.grad_scale = found_inf, None
        try:
            out = inner.step(closure) if closure is not None else inner.step()
        finally:
            del inner.found_inf, inner.grad_scale
        window.flags = found_inf.reshape(1)
        self._unsettled = window
        return out

    def _deferred_values(self) -> Tensor | None:
        """A method's 1-D device tensor to bring to the host with this step's one transfer
        (e.g. FAMO's losses re-evaluated after the last update), or ``None``. Overridden by
        methods that must not read the device outside the transfer; the host copy arrives in
        :meth:`_receive_deferred`, before the weights of this step are computed."""
        return None

    def _receive_deferred(self, values: np.ndarray) -> None:
        """The host copy of :meth:`_deferred_values` (see there)."""

    def _riders(self) -> Tensor | None:
        """Device values that ride along with this step's one transfer: the verdict on a step
        a fused optimizer took unchecked, then the method's deferred values."""
        flag = None if self._unsettled is None else self._unsettled.flags
        deferred = self._deferred_values()
        parts = [t.reshape(-1).to(torch.float64) for t in (flag, deferred) if t is not None]
        self._rider_layout = (flag is not None, 0 if deferred is None else deferred.numel())
        if not parts:
            return None
        device = parts[0].device
        return torch.cat([t.to(device) for t in parts])

    def _settle(self, host: np.ndarray | None) -> None:
        """Unpack :meth:`_riders`' host copy: settle the fused step's verdict, then hand the
        method its deferred values."""
        has_flag, n = getattr(self, "_rider_layout", (False, 0))
        self._rider_layout = (False, 0)
        if host is None:
            return
        self._settle_fused(host[:1] if has_flag else None)
        if n:
            self._receive_deferred(host[int(has_flag) : int(has_flag) + n])
            window = self._window
            if window is not None and window.num_steps == self.num_steps:
                # the update belongs to the step already taken: a skip of this one keeps it
                window.snapshot = _clone(self._balancer_state_dict())

    def _settle_fused(self, host_flag: np.ndarray | None) -> None:
        """The verdict on the step a fused optimizer took: if it skipped on the device, undo
        that window's balancer updates here too (and raise with ``on_nonfinite="raise"``)."""
        window, self._unsettled = self._unsettled, None
        if window is None or host_flag is None or not host_flag.any():
            return
        if window.snapshot is not None:
            self._load_balancer_state_dict(window.snapshot)
        self.num_steps = window.num_steps
        current = self._window
        if current is not None:  # the current window starts from the restored state
            current.snapshot, current.num_steps = _clone(window.snapshot), window.num_steps
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                "non-finite gradient written by the previous balanced backward: the fused "
                "optimizer skipped that step on the device; pass on_nonfinite='skip' to skip "
                "such steps silently"
            )
        self.num_skipped += 1

    def _reject(self, window: _Window, params: list[Tensor]) -> None:
        """A non-finite gradient found at step(): undo the window's balancer updates, then
        raise or count the skip."""
        if window.snapshot is not None:
            self._load_balancer_state_dict(window.snapshot)
        self.num_steps = window.num_steps
        where = {
            id(p): (g, i)
            for g, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
        }
        names = ", ".join(
            f"parameter {where[id(p)][1]} of param group {where[id(p)][0]} (shape {tuple(p.shape)})"
            for p in params[:5]
        ) + (f" and {len(params) - 5} more" if len(params) > 5 else "")
        if self.on_nonfinite == "raise":
            for p in window.fresh:
                p.grad = None
            raise NonFiniteError(
                f"non-finite gradient written by the balanced backward in {names}; "
                "pass on_nonfinite='skip' to skip such steps"
            )
        self.num_skipped += 1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rows_cache"] = None  # a scratch buffer, not state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return f"{type(self).__name__}(num_tasks={self.num_tasks}, {self._repr_options()})\n    {inner}"

    def _repr_options(self) -> str:
        return f"weight_heads={self.weight_heads}"

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"balancer"`` entry with the balancer state."""
        if self._unsettled is not None or self._deferred_values() is not None:
            self._settle(to_host(self._riders())[0])  # a checkpoint holds settled state
        sd = self.optimizer.state_dict()
        sd["balancer"] = {
            "method": type(self).__name__,
            "num_tasks": self.num_tasks,
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "skip_next_step": self._skip_next_step,
            "state": _clone(self._balancer_state_dict()),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (a plain inner-optimizer dict is accepted too).

        All or nothing: the ``"balancer"`` entry is checked first (missing keys are named), and
        if loading the balancer state or the inner optimizer's state fails, both are put back
        as they were before the call.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        bal = sd.pop("balancer", None)
        if bal is not None:
            self._check_balancer_entry(bal)
        old_inner = copy.deepcopy(self.optimizer.state_dict())
        old_state = _clone(self._balancer_state_dict())
        try:
            if bal is not None:
                self._load_balancer_state_dict(_clone(bal["state"]))
            self.optimizer.load_state_dict(sd)
        except Exception:
            self._load_balancer_state_dict(old_state)
            self.optimizer.load_state_dict(old_inner)
            raise
        if bal is not None:
            if bal["num_tasks"] is not None:
                self.num_tasks = int(bal["num_tasks"])
            self.num_steps = int(bal["num_steps"])
            self.num_skipped = int(bal["num_skipped"])
            self._skip_next_step = bool(bal.get("skip_next_step", False))
        self._window = self._unsettled = None

    def _check_balancer_entry(self, bal: Any) -> None:
        if not isinstance(bal, dict):
            raise TypeError(f"state_dict['balancer'] must be a dict, got {type(bal).__name__}")
        missing = [key for key in _BALANCER_KEYS if key not in bal]
        if missing:
            raise ValueError(f"state_dict['balancer'] is missing the keys {missing}")
        if bal["method"] != type(self).__name__:
            raise ValueError(
                f"state_dict was saved by {bal['method']}, cannot load into {type(self).__name__}"
            )
        for key in ("num_steps", "num_skipped"):
            if isinstance(bal[key], bool) or not isinstance(bal[key], int) or bal[key] < 0:
                raise ValueError(
                    f"state_dict['balancer'][{key!r}] must be an int >= 0, got {bal[key]!r}"
                )
        k = bal["num_tasks"]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(
                f"state_dict['balancer']['num_tasks'] must be a positive int, got {k!r}"
            )
        if k is not None and self.num_tasks is not None and k != self.num_tasks:
            raise ValueError(
                f"state_dict has num_tasks={k} but this optimizer has num_tasks={self.num_tasks}"
            )
        if not isinstance(bal["state"], dict):
            raise TypeError(
                f"state_dict['balancer']['state'] must be a dict, got {type(bal['state']).__name__}"
            )

    def _balancer_state_dict(self) -> dict[str, Any]:
        """Balancer state to checkpoint; override when it holds more than ``balancer_state``."""
        return self.balancer_state

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer_state = state

    # ------------------------------------------------------------------ the method
    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> WeightsResult:
        """Coefficients for the task gradients, computed on the host.

        Runs on the step's one host copy: every argument is a float64 NumPy array, and the
        method must not read device tensors (each read is a synchronization on a GPU).

        Args:
            gram: ``(K, K)`` Gram matrix of the task gradients (summed over blocks). Never
                ``None`` for a method with ``requires_gram``; otherwise ``None`` unless
                ``compute_gram`` is on.
            losses: ``(K,)`` task losses (under DDP: the mean over ranks).
            block_grams: ``(blocks, K, K)`` per-block Gram matrices, or ``None``.

        Returns:
            ``(weights, extras)``: ``(K,)`` coefficients, or ``(blocks, K)`` for per-block
            methods, and the method's diagnostics of this call (``BalanceInfo.extras``; arrays
            become host tensors). The base class returns ones (the plain sum) and no extras. A
            bare array is accepted too (no extras), for subclasses written before.
        """
        return np.ones_like(losses), {}

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        shared_parameters: Iterable[Tensor] | None = None,
    ) -> BalanceInfo:
        """Balance the task gradients and write the combined gradient into ``.grad``.

        The pipeline of one step: check the inputs and the graph (:mod:`mtl._checks`,
        :mod:`mtl._graph`); per-task gradients into a ``(K, N)`` matrix per block and their Gram
        matrices, on the device (:mod:`mtl._gram`); ONE host copy of the losses and the Gram
        matrices, on which the method's weights and every decision are computed
        (:mod:`mtl._host`); the combination reaches the parameters (:mod:`mtl._combine`).

        Args:
            losses: K scalar tensors (a sequence, or a 1-D tensor of length K).
            representation: the balance point (a tensor every task loss depends on, or a
                tuple/list of tensors treated as blocks). Exactly one of ``representation`` and
                ``shared_parameters`` must be given.
            shared_parameters: balance at the shared parameters instead (K backward passes).

        Returns:
            a :class:`~mtl.BalanceInfo` (its tensors live on the host); gradients are
            accumulated into ``.grad`` (call ``zero_grad()`` before, as with ``loss.backward()``).
        """
        task_losses = self._check_losses(losses)
        with autocast_off({loss.device.type for loss in task_losses}):
            return self._backward(task_losses, representation, shared_parameters)

    def _backward(
        self,
        task_losses: list[Tensor],
        representation: Tensor | Sequence[Tensor] | None,
        shared_parameters: Iterable[Tensor] | None,
    ) -> BalanceInfo:
        """The dispatcher: plain, representation-level or parameter-level step."""
        if (representation is None) == (shared_parameters is None):
            raise ValueError(
                "pass exactly one of representation= and shared_parameters= "
                f"(got {'both' if representation is not None else 'neither'})"
            )
        values = torch.stack([loss.detach().to(torch.float64) for loss in task_losses])
        self._open_window()
        level: Literal["representation", "parameters"]
        if representation is not None:
            level, blocks = "representation", check_representation(representation)
        else:
            level = "parameters"
            blocks = self._check_parameters(shared_parameters)  # type: ignore[arg-type]
        if not self.compute_gram and not self.uses_gradients:
            return self._backward_losses(task_losses, values, blocks, level)
        if not self.compute_gram and self._plain_backward_is_exact():
            return self._backward_plain(task_losses, values, blocks, level)
        if level == "representation":
            return self._backward_representation(task_losses, values, blocks)
        return self._backward_parameters(task_losses, values, blocks)

    # -- checks
    def _name(self, k: int) -> str:
        if self.task_names is not None:
            return f"task {k} ({self.task_names[k]!r})"
        return f"task {k}"

    def _managed(self) -> set[int]:
        """``id`` of every parameter tensor the inner optimizer manages."""
        return {id(p) for g in self.param_groups for p in g["params"]}

    def _check_losses(self, losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
        # num_tasks is fixed by the first call that gets through (_info/_nonfinite), not here
        return check_losses(losses, self.num_tasks, self._name)

    def _params(self) -> list[Tensor]:
        """The trainable parameters of the inner optimizer, in param-group order."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _open_window(self) -> _Window:
        """The accumulation window (backward calls since the last step/zero_grad): what a
        rejected step must restore."""
        if self._window is None:
            self._window = _Window(
                fresh=[p for p in self._params() if p.grad is None],
                snapshot=_clone(self._balancer_state_dict()),
                num_steps=self.num_steps,
            )
        return self._window

    def _close_window(self) -> None:
        """After the combined gradients are written: one device flag per parameter (no read;
        :meth:`step` reads it). Under DDP the flags are max-reduced, so every rank decides alike.
        """
        window = self._open_window()
        params = self._params()
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            window.flags, window.params = None, []
            return
        flags = nonfinite_flags(grads)
        active, group = self._group()
        if active:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        window.flags, window.params = flags, params

    def _check_representation(self, representation: Tensor | Sequence[Tensor]) -> list[Tensor]:
        return check_representation(representation)

    def _check_parameters(self, shared_parameters: Iterable[Tensor]) -> list[Tensor]:
        return check_parameters(shared_parameters, self._managed())

    def _analyse(self, losses: list[Tensor], blocks: list[Tensor]) -> GraphAnalysis:
        """One walk of the graph: raises for a trunk without parameters or an unreached loss."""
        analysis = analyse_graph(losses, blocks, self._managed())
        check_trunk(analysis)
        check_reached(analysis.reaches, self._name)
        return analysis

    def _split_heads(self, analysis: GraphAnalysis) -> list[list[Tensor]] | None:
        """Per task, the optimizer's parameters above the balance point, when the per-task
        passes may return them (the split is clean, ``grad_mode="loop"``, no DDP).

        ``None`` (use the general path: one backward of the summed losses with a hook at the
        representation) when some part above the balance point also lies below it (e.g. MMoE's
        gates read the embeddings), when it reaches a leaf that the inner optimizer does not
        manage, under DDP (DDP must see one ordinary backward), or with ``grad_mode="batched"``.
        """
        if self.grad_mode != "loop" or self._group()[0]:
            return None
        return analysis.heads

    def _heads_above(self, losses: list[Tensor], blocks: list[Tensor]) -> list[list[Tensor]] | None:
        """:meth:`_split_heads` of a fresh analysis of the graph."""
        return self._split_heads(analyse_graph(losses, blocks, self._managed()))

    def _nonfinite(
        self,
        level: Literal["representation", "parameters"],
        values: np.ndarray,
        what: str,
        bad: list[int],
    ) -> BalanceInfo:
        """Raise, or skip the step without touching the balancer state.

        No further backward pass is run. When skipping, the ``.grad`` of the smallest parameter
        of the inner optimizer is set to NaN (a cheap marker; no dense gradient for an
        embedding table): ``torch.amp.GradScaler`` then sees the overflow and lowers its scale,
        and the next :meth:`step` is a no-op in any case. ``zero_grad()`` clears it. Balancer
        updates of earlier backward calls of the same accumulation window are undone.
        """
        names = ", ".join(self._name(k) for k in bad) if bad else "the summed tasks"
        window = self._open_window()  # the whole window is rejected: its updates are undone
        if window.snapshot is not None:  # undo earlier backward calls and drawn numbers
            self._load_balancer_state_dict(window.snapshot)
        self.num_steps = window.num_steps
        self._window = None
        if self.on_nonfinite == "raise":
            for p in window.fresh:
                p.grad = None
            raise NonFiniteError(
                f"non-finite {what} for {names}; pass on_nonfinite='skip' to skip such steps"
            )
        if self.num_tasks is None:
            self.num_tasks = values.shape[0]
        _mark_overflow(self._params())
        self.num_skipped += 1
        self._skip_next_step = True
        return BalanceInfo(
            weights=torch.zeros(values.shape[0], dtype=torch.float64),
            losses=torch.from_numpy(np.array(values, dtype=np.float64)),
            gram=None,
            level=level,
            skipped=True,
            extras={"reason": f"non-finite {what} for {names}"},
        )

    def _decide(
        self,
        level: Literal["representation", "parameters"],
        values: np.ndarray,
        block_grams: np.ndarray | None,
        grad_finite: bool = True,
    ) -> BalanceInfo | None:
        """The host-side verdict on a step: ``None`` to go on, else the skip (or a raise).

        Non-finite losses are named first, then tasks with a non-finite gradient (diagonal of
        the Gram), then a non-finite gradient of the summed tasks.
        """
        bad = [k for k in range(values.shape[0]) if not math.isfinite(float(values[k]))]
        if bad:
            return self._nonfinite(level, values, "loss", bad)
        if block_grams is not None:
            diag = np.diagonal(block_grams, axis1=-2, axis2=-1).sum(0)
            bad = [k for k in range(values.shape[0]) if not math.isfinite(float(diag[k]))]
            if bad or not np.isfinite(block_grams).all():
                return self._nonfinite(level, values, "gradient", bad or list(range(len(diag))))
        if not grad_finite:
            return self._nonfinite(level, values, "gradient", [])
        return None

    # -- distributed
    def _group(self) -> tuple[bool, Any]:
        """(active, group): whether losses and Gram matrices are all-reduced, and over what."""
        if self.process_group is None or not dist.is_available() or not dist.is_initialized():
            return False, None
        group = None if self.process_group == "auto" else self.process_group
        return dist.get_world_size(group) > 1, group

    def _reduce(
        self, values: Tensor, block_grams: Tensor | None, gram_power: int = 2
    ) -> tuple[Tensor, Tensor | None]:
        """Global losses (mean over ranks) and Gram matrices (sum over ranks / W^2).

        With mean-reduced losses and DDP's averaged gradients, the global gradient of task k is
        the mean of the ranks' gradients, so its Gram matrix is sum_r M_r / W^2 (representation
        level). Gram matrices of already averaged gradients (parameter level) are the same on
        every rank: ``gram_power=0`` leaves them alone. One all-reduce, on the device.
        """
        active, group = self._group()
        if not active:
            return values, block_grams
        world = dist.get_world_size(group)
        if block_grams is None or gram_power == 0:
            packed = values.clone()
            dist.all_reduce(packed, group=group)
            return packed / world, block_grams
        packed = torch.cat([values, block_grams.reshape(-1)])
        dist.all_reduce(packed, group=group)
        k = values.shape[0]
        return packed[:k] / world, packed[k:].reshape(block_grams.shape) / world**gram_power

    def _host_grams(
        self,
        values: Tensor,
        block_grams: Tensor,
        rows: Sequence[Tensor],
        zero_rows: Sequence[set[int]],
        gram_power: int = 2,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reduce over ranks and copy the losses and Gram matrices to the host: ONE transfer.

        A float32 product that over- or underflowed (a diagonal entry infinite or below 1e-30
        for a row not known to be zero) is redone with exact power-of-two row scaling and read
        again: a second transfer, on such rare steps only.
        """
        reduced_values, reduced = self._reduce(values, block_grams, gram_power)
        host_values, host_grams, pending = to_host(reduced_values, reduced, self._riders())
        assert host_values is not None and host_grams is not None
        self._settle(pending)
        if not np.isfinite(host_values).all():
            return host_values, host_grams
        redo = [
            b
            for b in range(len(rows))
            if rows[b].dtype != torch.float64
            and set(suspect_rows(np.diagonal(host_grams[b]).tolist())) - zero_rows[b]
        ]
        if redo:
            fixed = torch.stack(
                [rescaled_gram(r) if b in redo else block_grams[b] for b, r in enumerate(rows)]
            )
            if gram_power:  # the losses were reduced above; only the Gram matrices again
                _, reduced_fixed = self._reduce(values.new_zeros(0), fixed, gram_power)
                assert reduced_fixed is not None
                fixed = reduced_fixed
            (host_grams,) = to_host(fixed)
            assert host_grams is not None
        return host_values, host_grams

    def _average_rows(self, rows: list[Tensor]) -> list[Tensor]:
        """Parameter level under DDP: the per-task gradients averaged over ranks.

        Unlike representation gradients (disjoint coordinates per rank, so the global Gram is
        sum_r M_r / W^2), parameter gradients of all ranks live in the same space and the global
        Gram has cross-rank terms; it needs the averaged K x D gradients (one all-reduce per
        gradient matrix).
        """
        active, group = self._group()
        if not active:
            return rows
        world = dist.get_world_size(group)
        for r in rows:
            dist.all_reduce(r, group=group)
            r.div_(world)
        return rows

    # -- weights
    def _weights(
        self, values: np.ndarray, block_grams: np.ndarray | None, num_blocks: int
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        gram = None if block_grams is None else block_grams.sum(0)
        result = self._compute_weights(gram, values, block_grams)
        if isinstance(result, tuple):
            raw, extras = result
        else:  # TRANSITIONAL: balancers not yet converted report extras via _extras()
            raw, extras = result, getattr(self, "_extras", dict)()
        if isinstance(raw, Tensor):  # a subclass written against torch tensors
            raw = raw.detach().to("cpu", torch.float64).numpy()
        weights = np.asarray(raw, dtype=np.float64)
        k = values.shape[0]
        if weights.shape not in ((k,), (num_blocks, k)):
            raise RuntimeError(
                f"{type(self).__name__}._compute_weights returned shape {weights.shape}, "
                f"expected ({k},) or ({num_blocks}, {k})"
            )
        if not np.isfinite(weights).all():
            raise NonFiniteError(f"{type(self).__name__} produced non-finite weights {weights}")
        return weights, gram, _host_extras(extras)

    @staticmethod
    def _block_weights(weights: np.ndarray, num_blocks: int) -> np.ndarray:
        return (
            np.broadcast_to(weights, (num_blocks, weights.shape[-1]))
            if weights.ndim == 1
            else weights
        )

    def _head_coefficients(self, weights: np.ndarray) -> list[float] | None:
        """Coefficients of the task losses in the head backward (None = plain sum)."""
        if not self.weight_heads:
            return None
        return [float(c) for c in (weights if weights.ndim == 1 else weights.mean(0))]

    def _info(
        self,
        level: Literal["representation", "parameters"],
        weights: np.ndarray,
        values: np.ndarray,
        gram: np.ndarray | None,
        block_grams: np.ndarray | None,
        extras: dict[str, Any],
    ) -> BalanceInfo:
        self.num_steps += 1
        if self.num_tasks is None:
            self.num_tasks = values.shape[0]
        return BalanceInfo(
            weights=torch.from_numpy(np.array(weights, dtype=np.float64)),
            losses=torch.from_numpy(np.array(values, dtype=np.float64)),
            gram=None if gram is None else torch.from_numpy(np.array(gram, dtype=np.float64)),
            level=level,
            block_grams=None if block_grams is None else torch.from_numpy(block_grams.copy()),
            extras=extras,
        )

    # -- representation level
    def _task_representation_grads(
        self,
        losses: list[Tensor],
        blocks: list[Tensor],
        heads: Sequence[Sequence[Tensor]] | None = None,
    ) -> tuple[list[Tensor], list[tuple[Tensor | None, ...]], list[set[int]]]:
        """``rows[b][k] = dL_k / d blocks[b]`` (flattened, one ``(K, numel)`` matrix per block),
        ``head_grads[k][i] = dL_k / d heads[k][i]`` (the parameters task k reaches above the
        blocks; only with ``grad_mode="loop"``) and, per block, the tasks whose row is zero
        because their loss does not reach that block.

        Loop mode copies each task's gradient into its row as soon as it is computed (while it
        is still in cache) and drops it: no K live gradient tensors and no final stack.
        """
        k_tasks = len(losses)
        if self.grad_mode == "batched":
            stacked = torch.stack(losses)
            eye = torch.eye(k_tasks, dtype=stacked.dtype, device=stacked.device)
            per_block = torch.autograd.grad(
                stacked,
                blocks,
                grad_outputs=eye,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            rows = [
                z.new_zeros(k_tasks, z.numel()) if g is None else g.reshape(k_tasks, -1)
                for z, g in zip(blocks, per_block)
            ]
            unreached: list[set[int]] = [
                set(range(k_tasks)) if g is None else set() for g in per_block
            ]
            return rows, [], unreached
        rows = self._row_buffers(k_tasks, [(z.numel(), z.dtype, z.device) for z in blocks])
        head_grads: list[tuple[Tensor | None, ...]] = []
        zeros: list[set[int]] = [set() for _ in blocks]
        n = len(blocks)
        for k, loss in enumerate(losses):
            inputs = [*blocks, *heads[k]] if heads is not None else blocks
            gs = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            for b, g in enumerate(gs[:n]):
                if g is None:
                    rows[b][k].zero_()
                    zeros[b].add(k)
                else:
                    rows[b][k].copy_(g.reshape(-1))
            head_grads.append(gs[n:])
            del gs
        return rows, head_grads, zeros

    def _row_buffers(
        self, k: int, shapes: Sequence[tuple[int, torch.dtype, torch.device]]
    ) -> list[Tensor]:
        """``(K, numel)`` gradient matrices for blocks of ``(numel, dtype, device)``, kept from
        one step to the next while the shapes do not change: a fresh K x B x d buffer every step
        costs a page fault per 4 KiB page on first touch (K=16, 1 MiB per task: the copies took
        7.3 ms instead of 1.5 ms). The buffer is the one the step needs at its peak anyway; it
        is not part of the state_dict.
        """
        key = [(k, *shape) for shape in shapes]
        if self._rows_cache is None or self._rows_cache[0] != key:
            self._rows_cache = None  # free the old buffer before allocating the new one
            buffers = [torch.empty(k, n, dtype=dtype, device=device) for n, dtype, device in shapes]
            self._rows_cache = (key, buffers)
        return self._rows_cache[1]

    def _backward_representation(
        self, losses: list[Tensor], values: Tensor, blocks: list[Tensor]
    ) -> BalanceInfo:
        analysis = self._analyse(losses, blocks)
        # heads disjoint from the trunk: one pass per task gives both its representation gradient
        # and its heads' gradients, and the final backward runs through the trunk only
        heads = self._split_heads(analysis)
        rows, head_grads, zeros = self._task_representation_grads(losses, blocks, heads)
        grams = torch.stack([device_gram(r) for r in rows])
        host_values, host_grams = self._host_grams(values, grams, rows, zeros)
        verdict = self._decide("representation", host_values, host_grams)
        if verdict is not None:
            return verdict
        weights, gram, extras = self._weights(host_values, host_grams, len(blocks))
        bw = to_device(self._block_weights(weights, len(blocks)), rows[0].device)
        combined = [
            (bw[b].to(rows[b].dtype) @ rows[b]).view_as(blocks[b]) for b in range(len(blocks))
        ]
        coef = self._head_coefficients(weights)
        if heads is not None:
            torch.autograd.backward(blocks, grad_tensors=combined)  # the trunk only
            accumulate_head_grads(heads, head_grads, coef)
        else:
            handles = [register_grad_hook(z, replace_grad(c)) for z, c in zip(blocks, combined)]
            try:
                sum_backward(losses, coef)
            finally:
                for h in handles:
                    h.remove()
        self._close_window()
        return self._info(
            "representation",
            weights,
            host_values,
            gram,
            host_grams if len(blocks) > 1 else None,
            extras,
        )

    def _plain_backward_is_exact(self) -> bool:
        """Whether one plain backward of sum_k c_k L_k gives the balanced gradients.

        True only for methods whose weights depend neither on gradients nor on losses (so they
        are known before any backward pass) and that apply them to the heads too, or whose
        weights are all one. Overridden by EqualWeight.
        """
        return False

    def _backward_plain(
        self,
        losses: list[Tensor],
        values: Tensor,
        blocks: list[Tensor],
        level: Literal["representation", "parameters"],
    ) -> BalanceInfo:
        """One plain backward of ``sum_k c_k L_k``, for weights known without any gradient.

        Still checks that every loss reaches the balance point (a walk of the autograd graph)
        and that the gradient arriving at the balance point (representation level: a tensor
        hook; parameter level: the shared ``.grad``) is finite. The losses and that finiteness
        flag reach the host in one transfer, after the backward.
        """
        if level == "representation":
            self._analyse(losses, blocks)
        else:
            check_reached(depends_on(losses, blocks), self._name, parameters=True)
        # the weights depend on neither gradients nor losses (see _plain_backward_is_exact)
        weights, _, extras = self._weights(np.ones(len(losses)), None, len(blocks))
        flags: list[Tensor] = []
        handles = []
        if level == "representation":

            def check(grad: Tensor) -> None:
                flags.append(nonfinite_flags([grad]))

            handles = [register_grad_hook(z, check) for z in blocks]
        try:
            sum_backward(losses, [float(c) for c in weights])
        finally:
            for h in handles:
                h.remove()
        # every gradient the backward wrote, and the one arriving at the balance point
        grads = [p.grad for p in self._params()]
        if any(g is not None for g in grads):
            flags.append(nonfinite_flags(grads))
        bad = torch.cat(flags).amax().reshape(1) if flags else values.new_zeros(1)
        # one collective and one transfer: the flag travels with the losses (a mean over ranks
        # is positive when any rank saw a non-finite gradient)
        packed, _ = self._reduce(torch.cat([values, bad]), None)
        host, pending = to_host(packed, self._riders())
        assert host is not None
        self._settle(pending)
        k = values.shape[0]
        verdict = self._decide(level, host[:k], None, bool(host[k] == 0.0))
        if verdict is not None:
            return verdict
        self._window = None  # checked within this backward's transfer
        return self._info(level, weights, host[:k], None, None, extras)

    # -- loss level
    def _backward_losses(
        self,
        losses: list[Tensor],
        values: Tensor,
        blocks: list[Tensor],
        level: Literal["representation", "parameters"],
    ) -> BalanceInfo:
        """A loss-level method: the losses reach the host (ONE transfer, before any gradient
        is written, so a non-finite loss leaves ``.grad`` alone), the weights are computed
        there, and ONE backward of ``sum_k c_k L_k`` writes every gradient; those are checked
        on the device and read at :meth:`step` (or by a fused optimizer)."""
        if level == "representation":
            self._analyse(losses, blocks)
        else:
            check_reached(depends_on(losses, blocks), self._name, parameters=True)
        reduced, _ = self._reduce(values, None)
        host_values, pending = to_host(reduced, self._riders())
        assert host_values is not None
        self._settle(pending)
        verdict = self._decide(level, host_values, None)
        if verdict is not None:
            return verdict
        weights, _, extras = self._weights(host_values, None, 1)
        sum_backward(losses, [float(c) for c in weights])
        self._close_window()
        return self._info(level, weights, host_values, None, None, extras)

    # -- parameter level
    def _parameter_update_mode(self) -> str:
        if self.parameter_update != "auto":
            return self.parameter_update
        return "backward" if self._group()[0] else "direct"

    def _parameter_rows(self, losses: list[Tensor], params: list[Tensor]) -> list[_ParamBlock]:
        """The per-task gradients of the shared parameters, copied once into gradient matrices.

        Dense parameters of one dtype and device share ONE ``(K, sum of numel)`` matrix (kept
        from step to step like the representation rows); each sparse parameter gets its own
        matrix of the rows some task touched. Raises for a loss that reaches no parameter.
        """
        densify = self._group()[0]  # ranks touch different rows: average dense gradients
        k_tasks = len(losses)
        grads: list[tuple[Tensor | None, ...]] = []
        for k, loss in enumerate(losses):
            gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            if all(g is None for g in gs):
                raise ValueError(
                    f"the loss of {self._name(k)} does not depend on any of the shared_parameters"
                )
            grads.append(gs)
        sparse_idx = [
            i for i in range(len(params)) if not densify and any(_is_sparse(g[i]) for g in grads)
        ]
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i in range(len(params)):
            if i not in sparse_idx:
                groups.setdefault((params[i].dtype, params[i].device), []).append(i)
        shapes = [
            (sum(params[i].numel() for i in idx), dtype, device)
            for (dtype, device), idx in groups.items()
        ]
        blocks: list[_ParamBlock] = []
        for buf, idx in zip(self._row_buffers(k_tasks, shapes), groups.values()):
            offsets = [0]
            for i in idx:
                offsets.append(offsets[-1] + params[i].numel())
            for k in range(k_tasks):
                dst, src = [], []
                for j, i in enumerate(idx):
                    g = grads[k][i]
                    view = buf[k, offsets[j] : offsets[j + 1]]
                    if g is None:
                        view.zero_()
                    else:
                        dst.append(view)
                        src.append((g.to_dense() if g.is_sparse else g).reshape(-1))
                _copy_all(dst, src)
            zeros = [{k for k in range(k_tasks) if grads[k][i] is None} for i in idx]
            blocks.append(_ParamBlock(buf, [params[i] for i in idx], offsets, None, zeros))
        for i in sparse_idx:
            rows, ids = task_rows([g[i] for g in grads], params[i], densify=False)
            zeros = [{k for k in range(k_tasks) if grads[k][i] is None}]
            blocks.append(_ParamBlock(rows, [params[i]], [0, rows.shape[1]], ids, zeros))
        return blocks

    def _backward_parameters(
        self, losses: list[Tensor], values: Tensor, params: list[Tensor]
    ) -> BalanceInfo:
        blocks = self._parameter_rows(losses, params)
        self._average_rows([blk.rows for blk in blocks])
        # the Gram matrices' blocks: one per parameter tensor for per-block methods (MetaBalance
        # semantics), else one per gradient matrix (their sum is the Gram of all shared params)
        pieces: list[tuple[_ParamBlock, int | None]]
        if self.per_block:
            order = {id(p): i for i, p in enumerate(params)}  # blocks in the caller's order
            pieces = sorted(
                ((blk, j) for blk in blocks for j in range(len(blk.params))),
                key=lambda piece: order[id(piece[0].params[piece[1] or 0])],
            )
        else:
            pieces = [(blk, None) for blk in blocks]
        piece_rows = [blk.piece(j) for blk, j in pieces]
        zero = [blk.zero_rows(j) for blk, j in pieces]
        grams = torch.stack([device_gram(r) for r in piece_rows])
        host_values, host_grams = self._host_grams(values, grams, piece_rows, zero, gram_power=0)
        verdict = self._decide("parameters", host_values, host_grams)
        if verdict is not None:
            return verdict
        weights, gram, extras = self._weights(host_values, host_grams, len(pieces))
        bw = to_device(self._block_weights(weights, len(pieces)), piece_rows[0].device)
        combined: list[tuple[Tensor, Tensor]] = []  # (parameter, its combined gradient)
        for (blk, j), r, w in zip(pieces, piece_rows, bw):
            flat = w.to(r.dtype) @ r
            for jj in range(len(blk.params)) if j is None else [j]:
                p = blk.params[jj]
                part = flat if j is not None else flat[blk.offsets[jj] : blk.offsets[jj + 1]]
                combined.append((p, combine_rows(part, blk.ids, p)))
        coef = self._head_coefficients(weights)
        if self._parameter_update_mode() == "backward":
            # one ordinary backward; hooks replace each shared parameter's incoming gradient,
            # so DDP's own hooks average the combined gradient as usual
            handles = [register_grad_hook(p, replace_grad(g)) for p, g in combined]
            try:
                sum_backward(losses, coef)
            finally:
                for h in handles:
                    h.remove()
        else:
            shared = {id(p) for p in params}
            heads = [
                p
                for g in self.param_groups
                for p in g["params"]
                if p.requires_grad and id(p) not in shared
            ]
            if heads:  # heads only: the trunk is not traversed again
                sum_backward(losses, coef, inputs=heads)
            for p, g in combined:
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad = p.grad + g if p.grad.is_sparse else p.grad.add_(g)
        self._close_window()
        return self._info(
            "parameters",
            weights,
            host_values,
            gram,
            host_grams if self.per_block else None,
            extras,
        )


# ---------------------------------------------------------------------- helpers
def _host_extras(extras: Mapping[str, Any]) -> dict[str, Any]:
    """A method's diagnostics as ``BalanceInfo.extras``: arrays become (copied) host tensors."""
    return {
        name: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray | np.generic) else v
        for name, v in extras.items()
    }


class _ParamBlock:
    """One gradient matrix of the parameter level.

    ``rows`` is ``(K, n)``: a dense block holds several parameters, parameter ``j`` in columns
    ``offsets[j]:offsets[j+1]``; a sparse block holds the rows ``ids`` of one parameter that some
    task touched. ``zeros[j]`` are the tasks that do not reach parameter ``j`` (zero rows).
    """

    def __init__(
        self,
        rows: Tensor,
        params: list[Tensor],
        offsets: list[int],
        ids: Tensor | None,
        zeros: list[set[int]],
    ) -> None:
        self.rows, self.params, self.offsets, self.ids, self.zeros = (
            rows,
            params,
            offsets,
            ids,
            zeros,
        )

    def piece(self, j: int | None) -> Tensor:
        """The columns of parameter ``j`` (a view), or the whole matrix for ``None``."""
        if j is None:
            return self.rows
        return self.rows[:, self.offsets[j] : self.offsets[j + 1]]

    def zero_rows(self, j: int | None) -> set[int]:
        """Tasks whose row of :meth:`piece` is zero by construction."""
        if j is not None:
            return self.zeros[j]
        return set.intersection(*self.zeros) if self.zeros else set()


def _is_sparse(g: Tensor | None) -> bool:
    return g is not None and g.is_sparse


def _copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i, as one fused launch where torch offers it."""
    if not dst:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and all(d.dtype == s.dtype for d, s in zip(dst, src)):
        foreach(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


@dataclass
class _Window:
    """The backward calls since the last ``step``/``zero_grad``: the parameters whose ``.grad``
    was ``None`` before the first, the balancer state and step count before it, and the device
    flags of the gradients written (:func:`mtl._finite.nonfinite_flags`) for ``step`` to read."""

    fresh: list[Tensor]
    snapshot: dict[str, Any] | None
    num_steps: int
    flags: Tensor | None = None
    params: list[Tensor] = field(default_factory=list)


def _mark_overflow(params: Sequence[Tensor]) -> None:
    """A skipped step's marker for ``GradScaler``: the smallest parameter's ``.grad`` is NaN."""
    if not params:
        return
    p = min(params, key=lambda q: q.numel())
    with torch.no_grad():
        p.grad = torch.full_like(p, float("nan"))


def init_optimizer_hooks(opt: Optimizer) -> None:
    """What ``torch.optim.Optimizer.__init__`` sets up besides ``param_groups``/``state``/
    ``defaults``: the hook dictionaries and the profiled ``step``. For optimizer-like wrappers
    that forward those three to other optimizers instead of calling ``Optimizer.__init__``."""
    opt._optimizer_step_pre_hooks = OrderedDict()
    opt._optimizer_step_post_hooks = OrderedDict()
    opt._optimizer_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_state_dict_post_hooks = OrderedDict()
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    opt._patch_step_function()


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return copy.deepcopy(obj)
