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

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ._autocast import autocast_off
from ._checkpoint import balanced_state_dict, load_balanced_state
from ._checks import (
    check_losses,
    check_parameters,
    check_reached,
    check_representation,
    check_trunk,
)
from ._ddp import is_sink, resolve_blocks
from ._finite import nonfinite_params
from ._graph import GraphAnalysis, analyse_graph
from ._host import to_host
from ._info import BalanceInfo
from ._parameter_level import backward_parameters
from ._representation_level import backward_representation
from ._single_pass import backward_losses, backward_plain
from ._window import (
    Window,
    close_window,
    fused_step,
    open_window,
    reject,
    step_flags,
    unsynced,
)

__all__ = ["BalancedOptimizer"]

#: what ``_compute_weights`` returns: ``(weights, extras)`` (or, for older subclasses, bare weights)
WeightsResult: TypeAlias = "tuple[np.ndarray, Mapping[str, Any]] | np.ndarray"

_NONFINITE_MODES = ("raise", "skip")
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
    #: with ``needs_closure``: ``True`` when the closure re-runs the whole model on the batch and
    #: takes no argument at both levels (FAMO); ``False`` when, at the representation level, it
    #: maps a (shifted) representation to the losses (MARIGOLD).
    closure_reruns_model: ClassVar[bool] = False
    #: whether the constructor takes a ``seed`` (methods that draw random numbers).
    accepts_seed: ClassVar[bool] = False
    #: ``False`` for loss-level methods (UW, DWA, RLW, GLS, FAMO): their weights are a function
    #: of the losses and their own state only, so a step is ONE weighted backward of
    #: ``sum_k c_k L_k`` (heads included, as in their papers) after the losses reach the host;
    #: no per-task gradient is computed (unless ``compute_gram`` asks for diagnostics).
    uses_gradients: ClassVar[bool] = True
    #: what ``BalanceInfo.weights`` holds: ``"weights"`` (non-negative task weights of a
    #: weighted sum) or ``"coefficients"`` (the expansion of a projected update over the
    #: original task gradients: any sign, any size; GradOPS, PCGrad). Tables and plots label
    #: them accordingly.
    weights_kind: ClassVar[str] = "weights"

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
        self._window: Window | None = None  # what step() must check before stepping
        # a window whose step a fused inner optimizer took with the flags on the device: its
        # verdict reaches the host with the next transfer (or at state_dict())
        self._unsettled: Window | None = None
        self._rider_layout: tuple[int, int] = (0, 0)  # what riders() packed: flags, values
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

        Under ``torch.distributed`` the same read also tells whether the ranks hold the same
        gradients (:func:`mtl._window.step_flags`, one max all-reduce): if DDP did not
        synchronize them (every backward of the window under ``no_sync()``, a forward that
        bypassed the DDP wrapper...), the step is not taken and a ``RuntimeError`` says why
        (with a fused optimizer: skipped on the device, raised at the next transfer).
        """
        window, self._window = self._window, None
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        flags = step_flags(self, window)
        if flags is not None:
            if getattr(self.optimizer, "_step_supports_amp_scaling", False):
                return fused_step(self, window, flags, closure)
            bad = to_host(flags)[0]
            assert bad is not None
            if bad[0]:
                assert window is not None
                reject(self, window, nonfinite_params(window.params))
                return None
            if bad[1:].any():
                raise unsynced(self, window)
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def _deferred_values(self) -> Tensor | None:
        """A method's 1-D device tensor to bring to the host with this step's one transfer
        (e.g. FAMO's losses re-evaluated after the last update), or ``None``. Overridden by
        methods that must not read the device outside the transfer; the host copy arrives in
        :meth:`_receive_deferred`, before the weights of this step are computed."""
        return None

    def _receive_deferred(self, values: np.ndarray) -> None:
        """The host copy of :meth:`_deferred_values` (see there)."""

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
        """The inner optimizer's state dict plus a ``"balancer"`` entry with the balancer state
        (:func:`mtl._checkpoint.balanced_state_dict`)."""
        return balanced_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (a plain inner-optimizer dict is accepted too).

        All or nothing: the ``"balancer"`` entry is checked first (missing keys are named), and
        if loading the balancer state or the inner optimizer's state fails, both are put back
        as they were before the call (:func:`mtl._checkpoint.load_balanced_state`).
        """
        load_balanced_state(self, state_dict)

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
            return backward_losses(self, task_losses, values, blocks, level)
        # (the plain path checks the gradient arriving at the representation with a hook on
        # it, which never sees one behind DDP's sink: the general path looks through it)
        if (
            not self.compute_gram
            and self._plain_backward_is_exact()
            and not (level == "representation" and any(is_sink(z.grad_fn) for z in blocks))
        ):
            return backward_plain(self, task_losses, values, blocks, level)
        if level == "representation":
            return backward_representation(self, task_losses, values, blocks)
        return backward_parameters(self, task_losses, values, blocks)

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

    def _open_window(self) -> Window:
        """The accumulation window (see :func:`mtl._window.open_window`)."""
        return open_window(self)

    def _close_window(self) -> None:
        """Flag the gradients just written, for :meth:`step` (:func:`mtl._window.close_window`)."""
        close_window(self)

    def _check_representation(self, representation: Tensor | Sequence[Tensor]) -> list[Tensor]:
        return check_representation(representation)

    def _check_parameters(self, shared_parameters: Iterable[Tensor]) -> list[Tensor]:
        return check_parameters(shared_parameters, self._managed())

    def _analyse(self, losses: list[Tensor], blocks: list[Tensor]) -> GraphAnalysis:
        """One walk of the graph: raises for a trunk without parameters or an unreached loss.

        A block that DDP's sink returned is looked through (:func:`mtl._ddp.resolve_blocks`):
        ``analysis.targets`` are where the gradients are taken.
        """
        analysis = analyse_graph(losses, resolve_blocks(blocks), self._managed())
        check_trunk(analysis)
        check_reached(analysis.reaches, self._name)
        return analysis

    def _split_heads(self, analysis: GraphAnalysis) -> list[list[Tensor]] | None:
        """Per task, the optimizer's parameters above the balance point, when the per-task
        passes may return them (the split is clean, ``grad_mode="loop"``, no DDP).

        ``None`` (use the general path: one backward of the summed losses with a hook at the
        representation) when some part above the balance point also lies below it (e.g. MMoE's
        gates read the embeddings), when it reaches a leaf that the inner optimizer does not
        manage, under DDP (DDP must see one ordinary backward, through its sink if there is
        one), with ``grad_mode="batched"``, or when a block is taken at the input of DDP's sink
        (no tensor to back-propagate from).
        """
        if (
            self.grad_mode != "loop"
            or self._group()[0]
            or analysis.sinks
            or not all(isinstance(t, Tensor) for t in analysis.targets)
        ):
            return None
        return analysis.heads

    def _heads_above(self, losses: list[Tensor], blocks: list[Tensor]) -> list[list[Tensor]] | None:
        """:meth:`_split_heads` of a fresh analysis of the graph."""
        return self._split_heads(analyse_graph(losses, blocks, self._managed()))

    # -- distributed
    def _group(self) -> tuple[bool, Any]:
        """(active, group): whether losses and Gram matrices are all-reduced, and over what."""
        if self.process_group is None or not dist.is_available() or not dist.is_initialized():
            return False, None
        group = None if self.process_group == "auto" else self.process_group
        return dist.get_world_size(group) > 1, group

    # -- representation level
    def _plain_backward_is_exact(self) -> bool:
        """Whether one plain backward of sum_k c_k L_k gives the balanced gradients.

        True only for methods whose weights depend neither on gradients nor on losses (so they
        are known before any backward pass) and that apply them to the heads too, or whose
        weights are all one. Overridden by EqualWeight.
        """
        return False


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
