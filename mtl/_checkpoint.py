"""Checkpointing a balanced optimizer: its ``state_dict`` and an all-or-nothing load.

The checkpoint is the inner optimizer's state dict plus a ``"balancer"`` entry (method name,
number of tasks, step and skip counts, the pending skip and the method's own state). Loading
checks that entry first, naming what is missing or wrong, and puts both the balancer state and
the inner optimizer's state back as they were when anything fails.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ._window import clone, step_transfer

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = ["BALANCER_KEYS", "balanced_state_dict", "check_balancer_entry", "load_balanced_state"]

#: the keys a ``"balancer"`` entry must hold (``skip_next_step`` is optional: older checkpoints)
BALANCER_KEYS = ("method", "num_tasks", "num_steps", "num_skipped", "state")


def balanced_state_dict(opt: BalancedOptimizer) -> dict[str, Any]:
    """The inner optimizer's state dict plus a ``"balancer"`` entry with the balancer state.

    A verdict still on the device (a fused step's, or a method's deferred values) is brought to
    the host first: a checkpoint holds settled state.
    """
    if opt._unsettled is not None or opt._deferred_values() is not None:
        step_transfer(opt)
    sd = opt.optimizer.state_dict()
    sd["balancer"] = {
        "method": type(opt).__name__,
        "num_tasks": opt.num_tasks,
        "num_steps": opt.num_steps,
        "num_skipped": opt.num_skipped,
        "skip_next_step": opt._skip_next_step,
        "state": clone(opt._balancer_state_dict()),
    }
    return sd


def load_balanced_state(opt: BalancedOptimizer, state_dict: dict[str, Any]) -> None:
    """Load what :func:`balanced_state_dict` returned (a plain inner-optimizer dict too).

    All or nothing: the ``"balancer"`` entry is checked first (missing keys are named), and if
    loading the balancer state or the inner optimizer's state fails, both are put back as they
    were before the call.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    sd = dict(state_dict)
    bal = sd.pop("balancer", None)
    if bal is not None:
        check_balancer_entry(bal, type(opt).__name__, opt.num_tasks)
    old_inner = copy.deepcopy(opt.optimizer.state_dict())
    old_state = clone(opt._balancer_state_dict())
    try:
        if bal is not None:
            opt._load_balancer_state_dict(clone(bal["state"]))
        opt.optimizer.load_state_dict(sd)
    except Exception:
        opt._load_balancer_state_dict(old_state)
        opt.optimizer.load_state_dict(old_inner)
        raise
    if bal is not None:
        if bal["num_tasks"] is not None:
            opt.num_tasks = int(bal["num_tasks"])
        opt.num_steps = int(bal["num_steps"])
        opt.num_skipped = int(bal["num_skipped"])
        opt._skip_next_step = bool(bal.get("skip_next_step", False))
    opt._window = opt._unsettled = None


def check_balancer_entry(bal: Any, method: str, num_tasks: int | None) -> None:
    """Raise, naming the key, unless ``bal`` is a ``"balancer"`` entry that ``method`` (the
    optimizer's class name, with ``num_tasks`` tasks or not yet known) can load."""
    if not isinstance(bal, dict):
        raise TypeError(f"state_dict['balancer'] must be a dict, got {type(bal).__name__}")
    missing = [key for key in BALANCER_KEYS if key not in bal]
    if missing:
        raise ValueError(f"state_dict['balancer'] is missing the keys {missing}")
    if bal["method"] != method:
        raise ValueError(f"state_dict was saved by {bal['method']}, cannot load into {method}")
    for key in ("num_steps", "num_skipped"):
        if isinstance(bal[key], bool) or not isinstance(bal[key], int) or bal[key] < 0:
            raise ValueError(
                f"state_dict['balancer'][{key!r}] must be an int >= 0, got {bal[key]!r}"
            )
    k = bal["num_tasks"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"state_dict['balancer']['num_tasks'] must be a positive int, got {k!r}")
    if k is not None and num_tasks is not None and k != num_tasks:
        raise ValueError(
            f"state_dict has num_tasks={k} but this optimizer has num_tasks={num_tasks}"
        )
    if not isinstance(bal["state"], dict):
        raise TypeError(
            f"state_dict['balancer']['state'] must be a dict, got {type(bal['state']).__name__}"
        )
