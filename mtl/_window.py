"""The accumulation window of a balanced step and its verdicts.

A *window* is the backward calls since the last ``step``/``zero_grad``. It remembers what a
rejected step must restore (the ``.grad`` that were ``None``, the balancer state, the step
count) and the device flag of the gradients it wrote (:func:`mtl._finite.nonfinite_flag`).
:meth:`mtl.BalancedOptimizer.step` turns it into the step's flags (:func:`step_flags`: under
``torch.distributed`` the flag is max-reduced over the ranks together with a sample of every
gradient, which tells whether DDP synchronized them) and reads those once (the ``found_inf``
pattern of ``torch.amp``) or hands them to a fused optimizer, whose verdict then *rides along*
with the next step's one host transfer (:func:`riders`, :func:`settle`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ._ddp import grad_probe, unsynced_error
from ._finite import nonfinite_flag
from ._host import to_host
from ._info import NonFiniteError

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = [
    "Window",
    "clone",
    "close_window",
    "fused_step",
    "mark_overflow",
    "open_window",
    "reject",
    "riders",
    "settle",
    "settle_fused",
    "step_flags",
    "step_transfer",
    "unsynced",
]


@dataclass
class Window:
    """The backward calls since the last ``step``/``zero_grad``: the parameters whose ``.grad``
    was ``None`` before the first, the balancer state and step count before it, and the device
    flag of the gradients written (:func:`mtl._finite.nonfinite_flag`; after a fused step,
    :func:`step_flags`: under ``torch.distributed`` the ``(non-finite, unsynchronized)`` pair)
    for ``step`` to read."""

    fresh: list[Tensor]
    snapshot: dict[str, Any] | None
    num_steps: int
    flags: Tensor | None = None
    params: list[Tensor] = field(default_factory=list)


def mark_overflow(params: Sequence[Tensor]) -> None:
    """A skipped step's marker for ``GradScaler``: the smallest parameter's ``.grad`` is NaN."""
    if not params:
        return
    p = min(params, key=lambda q: q.numel())
    with torch.no_grad():
        p.grad = torch.full_like(p, float("nan"))


def clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone(v) for v in obj)
    return copy.deepcopy(obj)


def open_window(opt: BalancedOptimizer) -> Window:
    """The accumulation window (backward calls since the last step/zero_grad): what a
    rejected step must restore."""
    if opt._window is None:
        opt._window = Window(
            fresh=[p for p in opt._params() if p.grad is None],
            snapshot=clone(opt._balancer_state_dict()),
            num_steps=opt.num_steps,
        )
    return opt._window


def close_window(opt: BalancedOptimizer) -> None:
    """After the combined gradients are written: one device flag for them all (no read, no
    collective; :meth:`step` reduces it over the ranks and reads it, :func:`step_flags`)."""
    window = open_window(opt)
    params = opt._params()
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        window.flags, window.params = None, []
        return
    window.flags, window.params = nonfinite_flag(grads), params


def step_flags(opt: BalancedOptimizer, window: Window | None) -> Tensor | None:
    """The flags ``step()`` decides on, on the device: ``(non-finite, unsynchronized)``, or the
    non-finite flag alone in a single process, or ``None`` when there is nothing to check.

    Under ``torch.distributed`` every step checks that the ranks hold the same gradients, as
    DDP's all-reduce leaves them (:func:`mtl._ddp.grad_probe`), in the one collective it makes
    anyway: the window's non-finite flag, the probe and minus the probe, max-reduced; the
    probes agree when their maximum is minus the maximum of their negatives (a probe that
    is not finite is left to the non-finite flag).
    """
    flags = None if window is None else window.flags
    active, group = opt._group()
    probe = grad_probe(opt._params()) if active else None
    if probe is None:  # the non-finite flag alone
        return flags
    bad = probe.new_zeros(1) if flags is None else flags.to(probe.device)
    packed = torch.cat([bad, probe, -probe])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    hi, lo = packed[1:2], -packed[2:3]
    # a non-finite gradient is the non-finite flag's to report
    differ = (hi != lo) & torch.isfinite(hi) & torch.isfinite(lo)
    return torch.cat([packed[:1], differ.to(packed.dtype)])


def unsynced(opt: BalancedOptimizer, window: Window | None) -> RuntimeError:
    """Gradients DDP did not synchronize: undo the window's balancer updates; the error to
    raise (the step is not taken)."""
    if window is not None and window.snapshot is not None:
        opt._load_balancer_state_dict(window.snapshot)
        opt.num_steps = window.num_steps
    return unsynced_error()


def fused_step(
    opt: BalancedOptimizer,
    window: Window | None,
    flags: Tensor,
    closure: Callable[[], float] | None,
) -> Any:
    """The inner step with ``found_inf`` on the device (the fused kernels skip the update
    and keep their step counts when it is non-zero); the verdict is settled later."""
    if window is None:  # a step after plain backward passes: the sync check only
        window = Window(fresh=[], snapshot=None, num_steps=opt.num_steps)
    found_inf = flags.amax().to(torch.float32)
    inner: Any = opt.optimizer
    inner.found_inf, inner.grad_scale = found_inf, None
    try:
        out = inner.step(closure) if closure is not None else inner.step()
    finally:
        del inner.found_inf, inner.grad_scale
    window.flags = flags
    opt._unsettled = window
    return out


def step_transfer(opt: BalancedOptimizer, *parts: Tensor | None) -> list[np.ndarray | None]:
    """The step's ONE host read: ``parts`` (as :func:`mtl._host.to_host`) together with the
    values riding along (:func:`riders`), which are settled (:func:`settle`) before the caller
    sees the rest."""
    host = to_host(*parts, riders(opt))
    settle(opt, host.pop())
    return host


def riders(opt: BalancedOptimizer) -> Tensor | None:
    """Device values that ride along with this step's one transfer: the verdict on a step
    a fused optimizer took unchecked, then the method's deferred values."""
    flag = None if opt._unsettled is None else opt._unsettled.flags
    deferred = opt._deferred_values()
    parts = [t.reshape(-1).to(torch.float64) for t in (flag, deferred) if t is not None]
    opt._rider_layout = (
        0 if flag is None else flag.numel(),
        0 if deferred is None else deferred.numel(),
    )
    if not parts:
        return None
    device = parts[0].device
    return torch.cat([t.to(device) for t in parts])


def settle(opt: BalancedOptimizer, host: np.ndarray | None) -> None:
    """Unpack the host copy of :func:`riders`: settle the fused step's verdict, then hand the
    method its deferred values."""
    n_flags, n = getattr(opt, "_rider_layout", (0, 0))
    opt._rider_layout = (0, 0)
    if host is None:
        return
    settle_fused(opt, host[: int(n_flags)] if n_flags else None)
    if n:
        opt._receive_deferred(host[int(n_flags) : int(n_flags) + n])
        window = opt._window
        if window is not None and window.num_steps == opt.num_steps:
            # the update belongs to the step already taken: a skip of this one keeps it
            window.snapshot = clone(opt._balancer_state_dict())


def settle_fused(opt: BalancedOptimizer, host_flag: np.ndarray | None) -> None:
    """The verdict on the step a fused optimizer took: if it skipped on the device, undo
    that window's balancer updates here too (and raise with ``on_nonfinite="raise"``, or
    for gradients DDP did not synchronize, :func:`unsynced`)."""
    window, opt._unsettled = opt._unsettled, None
    if window is None or host_flag is None or not host_flag.any():
        return
    if not host_flag[0] and host_flag[1:].any():  # finite, but not synchronized
        current = opt._window
        error = unsynced(opt, window)
        if current is not None and window.snapshot is not None:  # it starts from there
            current.snapshot, current.num_steps = clone(window.snapshot), window.num_steps
        raise error
    if window.snapshot is not None:
        opt._load_balancer_state_dict(window.snapshot)
    opt.num_steps = window.num_steps
    current = opt._window
    if current is not None:  # the current window starts from the restored state
        current.snapshot, current.num_steps = clone(window.snapshot), window.num_steps
    if opt.on_nonfinite == "raise":
        raise NonFiniteError(
            "non-finite gradient written by the previous balanced backward: the fused "
            "optimizer skipped that step on the device; pass on_nonfinite='skip' to skip "
            "such steps silently"
        )
    opt.num_skipped += 1


def reject(opt: BalancedOptimizer, window: Window, params: list[Tensor]) -> None:
    """A non-finite gradient found at step(): undo the window's balancer updates, then
    raise or count the skip."""
    if window.snapshot is not None:
        opt._load_balancer_state_dict(window.snapshot)
    opt.num_steps = window.num_steps
    where = {
        id(p): (g, i)
        for g, group in enumerate(opt.param_groups)
        for i, p in enumerate(group["params"])
    }
    names = ", ".join(
        f"parameter {where[id(p)][1]} of param group {where[id(p)][0]} (shape {tuple(p.shape)})"
        for p in params[:5]
    ) + (f" and {len(params) - 5} more" if len(params) > 5 else "")
    if opt.on_nonfinite == "raise":
        for p in window.fresh:
            p.grad = None
        raise NonFiniteError(
            f"non-finite gradient written by the balanced backward in {names}; "
            "pass on_nonfinite='skip' to skip such steps"
        )
    opt.num_skipped += 1
