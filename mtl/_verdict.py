"""The host-side verdict on a balanced step: go on, skip it, or raise.

It runs on the step's one host copy (the losses and the Gram matrices): non-finite losses are
named first, then tasks with a non-finite gradient (diagonal of the Gram), then a non-finite
gradient of the summed tasks. A rejected step leaves the balancer state as it was before the
accumulation window (:mod:`mtl._window`) and either raises :class:`~mtl.NonFiniteError` or,
with ``on_nonfinite="skip"``, marks the overflow and skips the next ``step``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from ._info import BalanceInfo, NonFiniteError
from ._window import mark_overflow

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = ["decide", "reject_step"]

Level = Literal["representation", "parameters"]


def reject_step(
    opt: BalancedOptimizer, level: Level, values: np.ndarray, what: str, bad: list[int]
) -> BalanceInfo:
    """Raise, or skip the step without touching the balancer state.

    No further backward pass is run. When skipping, the ``.grad`` of the smallest parameter of
    the inner optimizer is set to NaN (a cheap marker; no dense gradient for an embedding
    table): ``torch.amp.GradScaler`` then sees the overflow and lowers its scale, and the next
    ``step`` is a no-op in any case. ``zero_grad()`` clears it. Balancer updates of earlier
    backward calls of the same accumulation window are undone.
    """
    names = ", ".join(opt._name(k) for k in bad) if bad else "the summed tasks"
    window = opt._open_window()  # the whole window is rejected: its updates are undone
    if window.snapshot is not None:  # undo earlier backward calls and drawn numbers
        opt._load_balancer_state_dict(window.snapshot)
    opt.num_steps = window.num_steps
    opt._window = None
    if opt.on_nonfinite == "raise":
        for p in window.fresh:
            p.grad = None
        raise NonFiniteError(
            f"non-finite {what} for {names}; pass on_nonfinite='skip' to skip such steps"
        )
    if opt.num_tasks is None:
        opt.num_tasks = values.shape[0]
    mark_overflow(opt._params())
    opt.num_skipped += 1
    opt._skip_next_step = True
    return BalanceInfo(
        weights=torch.zeros(values.shape[0], dtype=torch.float64),
        losses=torch.from_numpy(np.array(values, dtype=np.float64)),
        gram=None,
        level=level,
        skipped=True,
        extras={"reason": f"non-finite {what} for {names}"},
    )


def decide(
    opt: BalancedOptimizer,
    level: Level,
    values: np.ndarray,
    block_grams: np.ndarray | None,
    grad_finite: bool = True,
) -> BalanceInfo | None:
    """``None`` to go on, else the skipped step's info (or a raise): see the module."""
    bad = [k for k in range(values.shape[0]) if not math.isfinite(float(values[k]))]
    if bad:
        return reject_step(opt, level, values, "loss", bad)
    if block_grams is not None:
        diag = np.diagonal(block_grams, axis1=-2, axis2=-1).sum(0)
        bad = [k for k in range(values.shape[0]) if not math.isfinite(float(diag[k]))]
        if bad or not np.isfinite(block_grams).all():
            return reject_step(opt, level, values, "gradient", bad or list(range(len(diag))))
    if not grad_finite:
        return reject_step(opt, level, values, "gradient", [])
    return None
