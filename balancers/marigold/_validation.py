"""Checks of MARIGOLD's options and of a call's arguments, with the errors they raise.

The constructor's checks (``compute_gram`` refused, the choice options, the step sizes and
radii, the integer options, the modules put in eval mode around the closure), the closure each
estimator needs at each level (its presence and its arity), and the combinations of estimator,
normalisation and level that a step refuses. Each check raises the error a user sees; none
changes the optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from mtl._checks import closure_arity_mismatch

from .._options import check_choice, check_positive
from ._closure import _check_modules
from ._functional import (
    _ESTIMATORS,
    _FD_SCHEMES,
    _NORMALIZE,
    _PARAMETRIZATIONS,
    _STEP_CONTROLS,
    Closure,
    Level,
)

if TYPE_CHECKING:
    from ._optimizer import MARIGOLD


def refuse_compute_gram(kwargs: dict[str, Any]) -> None:
    """Raise on ``compute_gram=True``; drop a false ``compute_gram`` from ``kwargs``."""
    if kwargs.get("compute_gram"):
        raise ValueError(
            "MARIGOLD never computes per-task gradients, so compute_gram=True is not "
            "supported (use MGDA for Gram diagnostics)"
        )
    kwargs.pop("compute_gram", None)


def check_modes(
    estimator: str, parametrization: str, normalize: str, fd_scheme: str, step_control: str
) -> None:
    """Each choice option is one of its allowed values."""
    check_choice("estimator", estimator, _ESTIMATORS)
    check_choice("parametrization", parametrization, _PARAMETRIZATIONS)
    check_choice("normalize", normalize, _NORMALIZE)
    check_choice("fd_scheme", fd_scheme, _FD_SCHEMES)
    check_choice("step_control", step_control, _STEP_CONTROLS)


def check_sizes(
    min_step_scale: float, lr_weights: float, fd_step: float, mu: float
) -> tuple[float, float, float, float]:
    """``min_step_scale`` in (0, 1], ``lr_weights >= 0``, ``fd_step > 0`` and ``mu > 0``;
    returns them as floats, in that order."""
    min_step_scale = check_positive("min_step_scale", min_step_scale)
    if min_step_scale > 1:
        raise ValueError(f"min_step_scale must be in (0, 1], got {min_step_scale}")
    lr_weights = check_positive("lr_weights", lr_weights, allow_zero=True)
    fd_step = check_positive("fd_step", fd_step)
    mu = check_positive("mu", mu)
    return min_step_scale, lr_weights, fd_step, mu


def check_integers(num_perturbations: int, seed: int) -> None:
    """``num_perturbations`` is an int >= 1 and ``seed`` an int (``bool`` refused)."""
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
        raise TypeError(f"num_perturbations must be an int, got {num_perturbations!r}")
    if num_perturbations < 1:
        raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def check_eval_modules(
    eval_mode_closure: nn.Module | Sequence[nn.Module] | None, fd_scheme: str
) -> list[nn.Module]:
    """The modules of ``eval_mode_closure`` as a list; refused with ``fd_scheme="forward"``."""
    modules = _check_modules(eval_mode_closure)
    if modules and fd_scheme == "forward":
        raise ValueError(
            "eval_mode_closure needs fd_scheme='forward_closure' or 'central': with "
            "'forward' the baseline l(theta) is the losses passed to backward(), computed in "
            "training mode, while the shifted losses would be computed in eval mode"
        )
    return modules


def check_closure(closure: Closure | None, estimator: str, level: Level) -> None:
    """The ``"fd"`` estimator needs a closure, of no argument at the parameter level and of one
    (the shifted representation) at the representation level; the others ignore it."""
    if estimator != "fd":
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


def check_level(opt: MARIGOLD, level: Level) -> None:
    """The combinations a step refuses: the gaussian estimator at the parameter level under
    ``torch.distributed``, and ``normalize="grad_norm"`` with the amortized estimator at the
    representation level (it needs the parameter gradient's norm)."""
    if opt.estimator == "gaussian" and level == "parameters" and opt._group()[0]:
        raise NotImplementedError(
            "estimator='gaussian' at the parameter level is not supported under "
            "torch.distributed; use 'fd' or 'amortized', or representation="
        )
    if (
        opt.estimator == "amortized"
        and level == "representation"
        and (opt.normalize == "grad_norm")
    ):
        raise ValueError(
            "normalize='grad_norm' with estimator='amortized' needs the norm of the "
            "parameter gradient: pass shared_parameters=, or use normalize='max_abs'"
        )
