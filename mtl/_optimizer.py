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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ._graph import depends_on, gram_matrix, replace_grad, weighted_sum
from ._info import BalanceInfo, NonFiniteError

__all__ = ["BalancedOptimizer"]

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
        self.compute_gram = self.requires_gram if compute_gram is None else bool(compute_gram)
        self.parameter_update = parameter_update
        #: level of the backward in progress ("representation" or "parameters"), for subclasses
        self.level: Literal["representation", "parameters"] | None = None
        #: balancer state saved by state_dict (moving averages, weights...); subclasses fill it.
        self.balancer_state: dict[str, Any] = {}
        self.num_steps = 0  # balanced backward passes that updated the balancer
        self.num_skipped = 0  # steps skipped because of a non-finite loss or gradient
        self._skip_next_step = False
        self._rows_cache: tuple[list[Any], list[Tensor]] | None = None

        # param_groups/state/defaults are forwarded to the inner optimizer (properties below)
        init_optimizer_hooks(self)

    # ------------------------------------------------------------------ forwarding
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
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
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer, unless the last balanced backward was skipped."""
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

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
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus a ``"balancer"`` entry with the balancer state."""
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned (a plain inner-optimizer dict is accepted too)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        bal = sd.pop("balancer", None)
        if bal is not None:
            if bal.get("method") != type(self).__name__:
                raise ValueError(
                    f"state_dict was saved by {bal.get('method')}, cannot load into "
                    f"{type(self).__name__}"
                )
            k = bal.get("num_tasks")
            if k is not None and self.num_tasks is not None and k != self.num_tasks:
                raise ValueError(
                    f"state_dict has num_tasks={k} but this optimizer has num_tasks={self.num_tasks}"
                )
        self.optimizer.load_state_dict(sd)
        if bal is not None:
            if bal.get("num_tasks") is not None:
                self.num_tasks = bal["num_tasks"]
            self.num_steps = int(bal["num_steps"])
            self.num_skipped = int(bal["num_skipped"])
            self._skip_next_step = bool(bal.get("skip_next_step", False))
            self._load_balancer_state_dict(_clone(bal["state"]))

    def _balancer_state_dict(self) -> dict[str, Any]:
        """Balancer state to checkpoint; override when it holds more than ``balancer_state``."""
        return self.balancer_state

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer_state = state

    # ------------------------------------------------------------------ the method
    def _compute_weights(
        self, gram: Tensor | None, losses: Tensor, block_grams: Tensor | None
    ) -> Tensor:
        """Coefficients for the task gradients.

        Args:
            gram: ``(K, K)`` float64 Gram matrix of the task gradients (summed over blocks), or
                ``None`` when ``compute_gram`` is off.
            losses: ``(K,)`` float64 detached losses.
            block_grams: ``(blocks, K, K)`` per-block Gram matrices, or ``None``.

        Returns:
            ``(K,)`` coefficients, or ``(blocks, K)`` for per-block methods. The base class
            returns ones (the plain sum).
        """
        return torch.ones_like(losses)

    def _extras(self) -> dict[str, Any]:
        """Method-specific diagnostics of the last call, reported in ``BalanceInfo.extras``."""
        return {}

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        shared_parameters: Iterable[Tensor] | None = None,
    ) -> BalanceInfo:
        """Balance the task gradients and write the combined gradient into ``.grad``.

        Args:
            losses: K scalar tensors (a sequence, or a 1-D tensor of length K).
            representation: the balance point (a tensor every task loss depends on, or a
                tuple/list of tensors treated as blocks). Exactly one of ``representation`` and
                ``shared_parameters`` must be given.
            shared_parameters: balance at the shared parameters instead (K backward passes).

        Returns:
            a :class:`~mtl.BalanceInfo`; gradients are accumulated into ``.grad`` (call
            ``zero_grad()`` before, as with ``loss.backward()``).
        """
        task_losses = self._check_losses(losses)
        if (representation is None) == (shared_parameters is None):
            raise ValueError(
                "pass exactly one of representation= and shared_parameters= "
                f"(got {'both' if representation is not None else 'neither'})"
            )
        values = torch.stack([loss.detach().to(torch.float64) for loss in task_losses])
        bad = self._nonfinite_tasks(values)
        if representation is not None:
            level: Literal["representation", "parameters"] = "representation"
            blocks = self._check_representation(representation)
        else:
            level = "parameters"
            blocks = self._check_parameters(shared_parameters)  # type: ignore[arg-type]
        self.level = level
        if bad:
            return self._nonfinite(level, values, "loss", bad)
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

    def _check_losses(self, losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
        if isinstance(losses, Tensor):
            if losses.dim() != 1:
                raise ValueError(
                    "losses given as a tensor must be 1-D of length K, got shape "
                    f"{tuple(losses.shape)}"
                )
            items = list(losses.unbind(0))
        elif isinstance(losses, (list, tuple)):
            items = list(losses)
        else:
            raise TypeError(
                f"losses must be a sequence of scalar tensors or a 1-D tensor, got "
                f"{type(losses).__name__}"
            )
        if len(items) == 0:
            raise ValueError("losses is empty")
        if self.num_tasks is not None and len(items) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses (num_tasks), got {len(items)}")
        for k, loss in enumerate(items):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of {self._name(k)} is a {type(loss).__name__}, not a Tensor")
            if loss.dim() != 0:
                raise ValueError(
                    f"loss of {self._name(k)} must be a scalar tensor, got shape {tuple(loss.shape)}"
                    " (reduce it with .mean() or .sum())"
                )
            if not loss.requires_grad:
                raise ValueError(f"loss of {self._name(k)} does not require grad")
        if self.num_tasks is None:
            self.num_tasks = len(items)
        return items

    def _check_representation(self, representation: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(representation, Tensor):
            blocks = [representation]
        elif isinstance(representation, (list, tuple)) and len(representation) > 0:
            blocks = list(representation)
        else:
            raise TypeError(
                "representation must be a tensor or a non-empty tuple/list of tensors, got "
                f"{type(representation).__name__}"
            )
        for b, z in enumerate(blocks):
            where = "representation" if len(blocks) == 1 else f"representation block {b}"
            if not isinstance(z, Tensor):
                raise TypeError(f"{where} is a {type(z).__name__}, not a Tensor")
            if not z.requires_grad:
                raise ValueError(
                    f"{where} does not require grad: it is detached from the trunk, so the "
                    "shared layers would receive no gradient"
                )
            if z.grad_fn is None:
                raise ValueError(
                    f"{where} is a leaf tensor: nothing below it would receive the balanced "
                    "gradient. Pass the output of the shared trunk, or use shared_parameters="
                )
        return blocks

    def _check_parameters(self, shared_parameters: Iterable[Tensor]) -> list[Tensor]:
        if isinstance(shared_parameters, Tensor):
            raise TypeError(
                "shared_parameters must be an iterable of parameters, got a single tensor "
                "(wrap it in a list)"
            )
        params = list(shared_parameters)
        if not params:
            raise ValueError("shared_parameters is empty")
        seen: set[int] = set()
        managed = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"shared_parameters[{i}] is a {type(p).__name__}, not a Tensor")
            if not p.requires_grad:
                raise ValueError(f"shared_parameters[{i}] does not require grad")
            if id(p) in seen:
                raise ValueError(f"shared_parameters[{i}] appears twice")
            if id(p) not in managed:
                raise ValueError(
                    f"shared_parameters[{i}] (shape {tuple(p.shape)}) is not managed by the inner "
                    "optimizer, so it would never be updated"
                )
            seen.add(id(p))
        return params

    def _nonfinite_tasks(self, values: Tensor) -> list[int]:
        if bool(torch.isfinite(values).all()):
            return []
        return [k for k in range(values.shape[0]) if not math.isfinite(float(values[k]))]

    def _nonfinite(
        self,
        level: Literal["representation", "parameters"],
        values: Tensor,
        what: str,
        bad: list[int],
    ) -> BalanceInfo:
        """Raise, or skip the step without touching the balancer state.

        When skipping, the ``.grad`` of every parameter of the inner optimizer is set to NaN (no
        backward pass is run): ``torch.amp.GradScaler`` then sees the overflow and lowers its
        scale, and the next :meth:`step` is a no-op in any case. ``zero_grad()`` clears them.
        """
        names = ", ".join(self._name(k) for k in bad) if bad else "the summed tasks"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {what} for {names}; pass on_nonfinite='skip' to skip such steps"
            )
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        p.grad = torch.full_like(p, float("nan"))
        self.num_skipped += 1
        self._skip_next_step = True
        k = values.shape[0]
        return BalanceInfo(
            weights=torch.zeros(k, dtype=torch.float64),
            losses=values,
            gram=None,
            level=level,
            skipped=True,
            extras={"reason": f"non-finite {what} for {names}"},
        )

    # -- distributed
    def _group(self) -> tuple[bool, Any]:
        """(active, group): whether losses and Gram matrices are all-reduced, and over what."""
        if self.process_group is None or not dist.is_available() or not dist.is_initialized():
            return False, None
        group = None if self.process_group == "auto" else self.process_group
        return dist.get_world_size(group) > 1, group

    def _reduce(self, values: Tensor, block_grams: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Global losses (mean over ranks) and Gram matrices (sum over ranks / W^2).

        With mean-reduced losses and DDP's averaged gradients, the global gradient of task k is
        the mean of the ranks' gradients, so its Gram matrix is sum_r M_r / W^2.
        """
        active, group = self._group()
        if not active:
            return values, block_grams
        world = dist.get_world_size(group)
        parts = [values] if block_grams is None else [values, block_grams.reshape(-1)]
        packed = torch.cat(parts)
        dist.all_reduce(packed, group=group)
        k = values.shape[0]
        values = packed[:k] / world
        if block_grams is not None:
            block_grams = packed[k:].reshape(block_grams.shape) / world**2
        return values, block_grams

    def _average_rows(self, rows: list[Tensor]) -> list[Tensor]:
        """Parameter level under DDP: the per-task gradients averaged over ranks.

        Unlike representation gradients (disjoint coordinates per rank, so the global Gram is
        sum_r M_r / W^2), parameter gradients of all ranks live in the same space and the global
        Gram has cross-rank terms; it needs the averaged K x D gradients (one all-reduce of K
        times the shared gradient size).
        """
        active, group = self._group()
        if not active:
            return rows
        flat = torch.cat([r.reshape(-1) for r in rows])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        out, offset = [], 0
        for r in rows:
            out.append(flat[offset : offset + r.numel()].view_as(r))
            offset += r.numel()
        return out

    # -- weights
    def _weights(
        self, values: Tensor, block_grams: Tensor | None, num_blocks: int
    ) -> tuple[Tensor, Tensor | None]:
        gram = None if block_grams is None else block_grams.sum(0)
        weights = self._compute_weights(gram, values, block_grams)
        k = values.shape[0]
        if not isinstance(weights, Tensor):
            weights = torch.as_tensor(weights, dtype=torch.float64)
        weights = weights.detach().to(torch.float64)
        if weights.shape not in ((k,), (num_blocks, k)):
            raise RuntimeError(
                f"{type(self).__name__}._compute_weights returned shape {tuple(weights.shape)}, "
                f"expected ({k},) or ({num_blocks}, {k})"
            )
        if not bool(torch.isfinite(weights).all()):
            raise NonFiniteError(f"{type(self).__name__} produced non-finite weights {weights}")
        return weights, gram

    def _block_weights(self, weights: Tensor, num_blocks: int) -> Tensor:
        return weights.expand(num_blocks, -1) if weights.dim() == 1 else weights

    def _head_coefficients(self, weights: Tensor) -> Tensor | None:
        """Coefficients of the task losses in the head backward (None = plain sum)."""
        if not self.weight_heads:
            return None
        return weights if weights.dim() == 1 else weights.mean(0)

    def _check_gram(
        self,
        level: Literal["representation", "parameters"],
        values: Tensor,
        block_grams: Tensor,
    ) -> BalanceInfo | None:
        diag = block_grams.diagonal(dim1=-2, dim2=-1).sum(0)
        bad = self._nonfinite_tasks(diag)
        if not bad and not bool(torch.isfinite(block_grams).all()):
            bad = list(range(values.shape[0]))
        return self._nonfinite(level, values, "gradient", bad) if bad else None

    # -- representation level
    def _task_representation_grads(
        self,
        losses: list[Tensor],
        blocks: list[Tensor],
        heads: Sequence[Sequence[Tensor]] | None = None,
    ) -> tuple[list[Tensor], list[tuple[Tensor | None, ...]]]:
        """``rows[b][k] = dL_k / d blocks[b]`` (flattened, one ``(K, numel)`` matrix per block)
        and ``head_grads[k][i] = dL_k / d heads[k][i]`` (the parameters task k reaches above the
        blocks, from :meth:`_heads_above`; only with ``grad_mode="loop"``).

        Loop mode copies each task's gradient into its row as soon as it is computed (while it
        is still in cache) and drops it: no K live gradient tensors and no final stack.
        Raises for a loss that does not reach any block.
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
            # a task that reaches no block has all-zero rows but must still be reported
            if not all(depends_on(losses, blocks)):
                self._raise_unreached(losses, blocks)
            rows = [
                z.new_zeros(k_tasks, z.numel()) if g is None else g.reshape(k_tasks, -1)
                for z, g in zip(blocks, per_block)
            ]
            return rows, []
        rows = self._row_buffers(k_tasks, blocks)
        head_grads = []
        n = len(blocks)
        for k, loss in enumerate(losses):
            inputs = [*blocks, *heads[k]] if heads is not None else blocks
            gs = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            if all(g is None for g in gs[:n]):
                self._raise_unreached(losses, blocks, only=k)
            for b, g in enumerate(gs[:n]):
                if g is None:
                    rows[b][k].zero_()
                else:
                    rows[b][k].copy_(g.reshape(-1))
            head_grads.append(gs[n:])
            del gs
        return rows, head_grads

    def _row_buffers(self, k: int, blocks: list[Tensor]) -> list[Tensor]:
        """The ``(K, numel)`` gradient matrices, kept from one step to the next while the shapes
        do not change: a fresh K x B x d buffer every step costs a page fault per 4 KiB page on
        first touch (K=16, 1 MiB per task: the copies took 7.3 ms instead of 1.5 ms). The
        buffer is the one the step needs at its peak anyway; it is not part of the state_dict.
        """
        key = [(k, z.numel(), z.dtype, z.device) for z in blocks]
        if self._rows_cache is None or self._rows_cache[0] != key:
            self._rows_cache = None  # free the old buffer before allocating the new one
            self._rows_cache = (key, [z.new_empty(k, z.numel()) for z in blocks])
        return self._rows_cache[1]

    def _raise_unreached(
        self, losses: list[Tensor], blocks: list[Tensor], only: int | None = None
    ) -> None:
        reached = depends_on(losses, blocks)
        bad = [k for k, r in enumerate(reached) if not r] if only is None else [only]
        names = ", ".join(self._name(k) for k in bad)
        raise ValueError(
            f"the loss of {names} does not depend on the representation: its graph never "
            "reaches the given tensor (was it computed from a detached copy, or from another "
            "tensor than the one the heads consume? With torch.compile, compile the trunk and "
            "the heads as separate regions so the representation is a boundary between them, "
            "or balance at shared_parameters=)"
        )

    def _backward_representation(
        self, losses: list[Tensor], values: Tensor, blocks: list[Tensor]
    ) -> BalanceInfo:
        self._check_trunk(blocks)
        # heads disjoint from the trunk: one pass per task gives both its representation gradient
        # and its heads' gradients, and the final backward runs through the trunk only
        heads = self._heads_above(losses, blocks)
        rows, head_grads = self._task_representation_grads(losses, blocks, heads)
        block_grams = torch.stack([gram_matrix(r) for r in rows])
        failed = self._check_gram("representation", values, block_grams)
        if failed is not None:
            return failed
        values, block_grams = self._reduce(values, block_grams)
        weights, gram = self._weights(values, block_grams, len(blocks))
        bw = self._block_weights(weights, len(blocks))
        combined = [
            (bw[b].to(rows[b].dtype) @ rows[b]).view_as(blocks[b]) for b in range(len(blocks))
        ]
        if heads is not None:
            torch.autograd.backward(blocks, grad_tensors=combined)  # the trunk only
            coef = self._head_coefficients(weights)
            _accumulate_head_grads(heads, head_grads, None if coef is None else coef.tolist())
        else:
            handles = [z.register_hook(replace_grad(c)) for z, c in zip(blocks, combined)]
            try:
                _sum_backward(losses, self._head_coefficients(weights))
            finally:
                for h in handles:
                    h.remove()
        self.num_steps += 1
        return BalanceInfo(
            weights=weights,
            losses=values,
            gram=gram,
            level="representation",
            block_grams=block_grams if len(blocks) > 1 else None,
            extras=self._extras(),
        )

    def _heads_above(self, losses: list[Tensor], blocks: list[Tensor]) -> list[list[Tensor]] | None:
        """Per task, the optimizer's parameters above the balance point, when the split is clean.

        Walks the autograd graph from each loss, stopping at the representation blocks, and
        collects the parameters it reaches (that task's heads). Returns ``None`` (use the general
        path: one backward of the summed losses with a hook at the representation) when some
        part above the balance point also lies below it (e.g. MMoE's gates read the embeddings),
        when it reaches a leaf that the inner optimizer does not manage, under DDP (DDP must see
        one ordinary backward), or with ``grad_mode="batched"``.
        """
        if self.grad_mode != "loop" or self._group()[0]:
            return None
        block_nodes = {id(z.grad_fn) for z in blocks}
        below: set[int] = set()
        stack = [z.grad_fn for z in blocks]
        while stack:
            node = stack.pop()
            if node is None or id(node) in below:
                continue
            below.add(id(node))
            stack.extend(c for c, _ in getattr(node, "next_functions", ()))
        managed = {id(p) for g in self.param_groups for p in g["params"]}
        per_task = []
        for loss in losses:
            found: dict[int, Tensor] = {}
            seen: set[int] = set()
            stack = [loss.grad_fn]
            while stack:
                node = stack.pop()
                if node is None or id(node) in seen or id(node) in block_nodes:
                    continue
                if id(node) in below:
                    return None  # the heads share graph with the trunk
                seen.add(id(node))
                var = getattr(node, "variable", None)
                if var is not None:
                    if id(var) not in managed:
                        return None
                    found[id(var)] = var
                    continue
                stack.extend(c for c, _ in getattr(node, "next_functions", ()))
            per_task.append(list(found.values()))
        return per_task

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
        hook; parameter level: the shared ``.grad``) is finite.
        """
        if level == "representation":
            self._check_trunk(blocks)
            reached = depends_on(losses, blocks)
            if not all(reached):
                self._raise_unreached(losses, blocks)
        else:
            for k, r in enumerate(depends_on(losses, blocks)):
                if not r:
                    raise ValueError(
                        f"the loss of {self._name(k)} does not depend on any of the "
                        "shared_parameters"
                    )
        values, _ = self._reduce(values, None)
        weights, _ = self._weights(values, None, len(blocks))
        finite = [True]
        handles = []
        if level == "representation":

            def check(grad: Tensor) -> None:
                if not _is_finite(grad):
                    finite[0] = False

            handles = [z.register_hook(check) for z in blocks]
        try:
            _sum_backward(losses, weights)
        finally:
            for h in handles:
                h.remove()
        if level == "parameters":
            finite[0] = all(p.grad is None or _is_finite(p.grad) for p in blocks)
        if not finite[0]:
            return self._nonfinite(level, values, "gradient", [])
        self.num_steps += 1
        return BalanceInfo(
            weights=weights,
            losses=values,
            gram=None,
            level=level,
            extras=self._extras(),
        )

    def _check_trunk(self, blocks: list[Tensor]) -> None:
        """Raise when no trainable parameter lies below the balance point (the trunk would
        receive no gradient, e.g. a representation rebuilt from a detached tensor)."""
        managed = {id(p) for g in self.param_groups for p in g["params"]}
        for b, z in enumerate(blocks):
            if not _reaches_parameter(z.grad_fn, managed):
                where = "representation" if len(blocks) == 1 else f"representation block {b}"
                raise ValueError(
                    f"no trainable parameter lies below the {where}: the shared trunk would "
                    "receive no gradient (is the representation computed from a detached "
                    "tensor?)"
                )

    # -- parameter level
    def _parameter_update_mode(self) -> str:
        if self.parameter_update != "auto":
            return self.parameter_update
        return "backward" if self._group()[0] else "direct"

    def _backward_parameters(
        self, losses: list[Tensor], values: Tensor, params: list[Tensor]
    ) -> BalanceInfo:
        grads: list[tuple[Tensor | None, ...]] = []
        for k, loss in enumerate(losses):
            gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            if all(g is None for g in gs):
                raise ValueError(
                    f"the loss of {self._name(k)} does not depend on any of the shared_parameters"
                )
            grads.append(gs)
        densify = self._group()[0]  # ranks touch different rows: average dense gradients
        rows, row_ids = [], []
        for i, p in enumerate(params):
            r, ids = _task_rows([g[i] for g in grads], p, densify)
            rows.append(r)
            row_ids.append(ids)
        rows = self._average_rows(rows)
        block_grams = torch.stack([gram_matrix(r) for r in rows])
        failed = self._check_gram("parameters", values, block_grams)
        if failed is not None:
            return failed
        values, _ = self._reduce(values, None)
        weights, gram = self._weights(values, block_grams, len(params))
        bw = self._block_weights(weights, len(params))
        shared = {id(p) for p in params}
        heads = [
            p
            for g in self.param_groups
            for p in g["params"]
            if p.requires_grad and id(p) not in shared
        ]
        combined = [
            _combine_rows(bw[i].to(rows[i].dtype) @ rows[i], ids, p)
            for i, (p, ids) in enumerate(zip(params, row_ids))
        ]
        if self._parameter_update_mode() == "backward":
            # one ordinary backward; hooks replace each shared parameter's incoming gradient,
            # so DDP's own hooks average the combined gradient as usual
            handles = [p.register_hook(replace_grad(g)) for p, g in zip(params, combined)]
            try:
                _sum_backward(losses, self._head_coefficients(weights))
            finally:
                for h in handles:
                    h.remove()
        else:
            if heads:  # heads only: the trunk is not traversed again
                _sum_backward(losses, self._head_coefficients(weights), inputs=heads)
            for p, g in zip(params, combined):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad = p.grad + g if p.grad.is_sparse else p.grad.add_(g)
        self.num_steps += 1
        return BalanceInfo(
            weights=weights,
            losses=values,
            gram=gram,
            level="parameters",
            block_grams=block_grams,
            extras=self._extras(),
        )


# ---------------------------------------------------------------------- helpers
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


def _sum_backward(
    losses: list[Tensor], coefficients: Tensor | None, inputs: list[Tensor] | None = None
) -> None:
    plain = coefficients is None or bool((coefficients == 1).all())
    total = weighted_sum(losses, None if plain else coefficients)
    if inputs is None:
        total.backward()
    else:
        total.backward(inputs=inputs)


def _accumulate_head_grads(
    heads: Sequence[Sequence[Tensor]],
    head_grads: Sequence[Sequence[Tensor | None]],
    coefficients: Sequence[float] | None,
) -> None:
    """``p.grad += sum_k c_k dL_k/dp`` over the tasks k that reach head parameter ``p``
    (``c_k = 1`` without coefficients); a parameter one task reaches takes that gradient as is.
    """
    totals: dict[int, tuple[Tensor, Tensor]] = {}
    for k, (params, grads) in enumerate(zip(heads, head_grads)):
        for p, g in zip(params, grads):
            if g is None:
                continue
            if coefficients is not None:
                g = g * coefficients[k]
            prev = totals.get(id(p))
            totals[id(p)] = (p, g if prev is None else prev[1] + g)
    for p, g in totals.values():
        p.grad = g if p.grad is None else p.grad + g


def _is_finite(t: Tensor) -> bool:
    """No NaN/inf entry, from one reduction (NaN and inf propagate through a sum): about 10x
    cheaper than an elementwise mask. A finite tensor whose sum overflows (|sum| > 3e38 in
    float32) is reported as non-finite, which only a diverged run produces."""
    if t.is_sparse:
        t = t._values()
    return bool(torch.isfinite(t.sum()))


def _reaches_parameter(root: object | None, params: set[int]) -> bool:
    """Whether an autograd graph reaches one of ``params`` (ids; depth-first, early exit)."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) in params:
            return True
        stack.extend(c for c, _ in getattr(node, "next_functions", ()))
    return False


def _task_rows(
    grads: list[Tensor | None], p: Tensor, densify: bool
) -> tuple[Tensor, Tensor | None]:
    """The K task gradients of one parameter as a ``(K, n)`` matrix.

    Sparse gradients (``nn.Embedding(sparse=True)``) stay sparse: only the rows touched by
    some task enter the matrix (the union of their row ids is returned), so a 1M-row table costs
    what the batch touches, not K dense copies. ``densify`` (DDP) forces dense rows.
    """
    sparse = [g for g in grads if g is not None and g.is_sparse]
    if sparse and not densify and all(g.sparse_dim() == 1 for g in sparse):
        coalesced = [None if g is None else g.coalesce() for g in grads]
        if all(c is not None and c.is_sparse for c in coalesced):
            ids = torch.cat([c.indices()[0] for c in coalesced]).unique()  # type: ignore[union-attr]
            tail = sparse[0].shape[1:]
            out = torch.zeros(
                len(grads), ids.numel(), *tail, dtype=sparse[0].dtype, device=sparse[0].device
            )
            for k, c in enumerate(coalesced):
                assert c is not None
                out[k].index_copy_(0, torch.searchsorted(ids, c.indices()[0]), c.values())
            return out.reshape(len(grads), -1), ids
    dense = [
        torch.zeros_like(p, memory_format=torch.contiguous_format)
        if g is None
        else (g.to_dense() if g.is_sparse else g)
        for g in grads
    ]
    return torch.stack([d.reshape(-1) for d in dense]), None


def _combine_rows(flat: Tensor, ids: Tensor | None, p: Tensor) -> Tensor:
    """``sum_k c_k g_k`` for one parameter, sparse again when the rows were."""
    if ids is None:
        return flat.view_as(p)
    values = flat.view(ids.numel(), *p.shape[1:])
    return torch.sparse_coo_tensor(
        ids.unsqueeze(0), values, p.shape, is_coalesced=True, check_invariants=False
    )


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
