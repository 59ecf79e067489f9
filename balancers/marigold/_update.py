"""The host half of a MARIGOLD step [R]: from the step's one transfer to the next ``lam``.

After the losses, the closure losses and the squared norms reach the host: the finite-difference
estimate ``h ~ M lam`` from their sums (:func:`fd_estimate`) or the amortized one from the
previous call (:func:`amortized_estimate`), the normalised weight step with its secant step
control (:func:`finish`, :func:`control_step`), the history the next call needs
(:func:`remember`) and the step's diagnostics (``BalanceInfo.extras``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._functional import _MIN_MOVE, _TINY, _normalize_np, _step_np

if TYPE_CHECKING:
    from ._optimizer import MARIGOLD


def normalization(opt: MARIGOLD) -> str:
    """The normalisation of ``h`` in use (``"auto"``: ``"max_abs"`` for the amortized
    estimator, ``"grad_norm"`` for the others)."""
    if opt.normalize != "auto":
        return opt.normalize
    return "max_abs" if opt.estimator == "amortized" else "grad_norm"


def fd_estimate(
    opt: MARIGOLD, value_sums: np.ndarray, raw: np.ndarray, shift_sq: float, divisor: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """``h`` from the host sums of the losses and the closure losses (``raw``: one row per
    call), with ``a = fd_step / sqrt(shift_sq)``; the estimate of the sums is divided by
    ``divisor`` (``W`` at the parameter level: the mean; ``W^2`` at the representation
    level). A squared norm at or below 1e-30 gives ``h = 0`` (no information)."""
    k = value_sums.shape[0]
    extras: dict[str, Any] = {"fd_step_size": None, "closure_calls": int(raw.shape[0])}
    if not shift_sq > _TINY:
        return np.zeros(k), extras
    a = opt.fd_step / math.sqrt(shift_sq)
    extras["fd_step_size"] = a
    if opt.fd_scheme == "forward":
        h = (value_sums - raw[0]) / a
    elif opt.fd_scheme == "forward_closure":
        h = (raw[0] - raw[1]) / a
        world = opt._world()
        extras["baseline_gap"] = torch.from_numpy((raw[0] - value_sums) / world)
    else:
        h = (raw[0] - raw[1]) / (2 * a)
    return (h / divisor if divisor != 1 else h), extras


def amortized_estimate(opt: MARIGOLD, values: np.ndarray) -> np.ndarray | None:
    """``h = (l_{t-1} - l_t) / eta_{t-1}`` from the previous call; ``None`` at the first call
    or after a non-positive learning rate."""
    prev = opt._state().get("previous")
    if not prev or float(prev["lr"]) <= 0:
        return None
    estimate: np.ndarray = (prev["losses"] - values) / float(prev["lr"])
    return estimate


def remember(opt: MARIGOLD, values: np.ndarray, used: np.ndarray, grad_sq: float | None) -> None:
    """Keep what the amortized estimator's next call needs (the weights used, the losses, the
    inner optimizer's learning rate and ``|g|^2``); nothing for the other estimators."""
    if opt.estimator == "amortized":
        opt.balancer_state["previous"] = {
            "weights": used.copy(),
            "losses": np.array(values, dtype=np.float64),
            "lr": _inner_lr(opt),
            "grad_norm_sq": grad_sq,
        }


def _inner_lr(opt: MARIGOLD) -> float:
    group = opt.param_groups[0]
    return float(group["lr"]) if "lr" in group else 1.0


def finish(
    opt: MARIGOLD,
    values: np.ndarray,
    h: np.ndarray | None,
    grad_sq: float,
    extras: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Normalise and update lam (when there is an estimate), on the host. Returns the
    weights used for this step and the step's diagnostics (``BalanceInfo.extras``)."""
    st = opt._state()
    used = st["weights"].copy()
    mode = normalization(opt)
    h_norm = None
    if h is not None:
        h = np.array(h, dtype=np.float64)
        gsq: float | None = grad_sq
        at = used  # the weights whose M lam the estimate measures
        if opt.estimator == "amortized":
            prev = st["previous"]
            at = prev["weights"]
            gsq = prev.get("grad_norm_sq")
            gsq = float("nan") if gsq is None else float(gsq)
        if opt.step_control == "secant":
            control_step(opt, h, at)
        h_norm = _normalize_np(h, mode, gsq if mode == "grad_norm" else None)
        new, logits = _step_np(
            used,
            h_norm,
            opt.lr_weights * float(st["step_scale"]),
            opt.parametrization,
            st.get("logits"),
        )
        if opt.step_control == "secant":
            _record_move(st, h, used, new)
        st["weights"] = new
        if logits is not None:
            st["logits"] = logits
        st["num_updates"] = int(st.get("num_updates", 0)) + 1
    diagnostics = {
        "estimator": opt.estimator,
        "h_hat": None if h is None else torch.from_numpy(h.copy()),
        "h_normalized": None if h_norm is None else torch.from_numpy(h_norm.copy()),
        "grad_norm_sq": grad_sq,
        "normalize": mode,
        "step_scale": float(st["step_scale"]),
        **extras,
        "next_weights": torch.from_numpy(st["weights"].copy()),
    }
    opt.num_steps += 1
    if opt.num_tasks is None:
        opt.num_tasks = int(values.shape[0])
    return used, diagnostics


def _record_move(st: dict[str, Any], h: np.ndarray, used: np.ndarray, new: np.ndarray) -> None:
    """Secant step control: remember the move ``used -> new`` when it descends ``F`` (slope
    ``q = h . move < 0``, beyond the smallest move), to measure its overshoot later."""
    move = new - used
    q = float(h @ move)
    if q < 0 and float(np.abs(move).max()) > _MIN_MOVE:
        # a descent move of F: remember it to measure the overshoot later
        pending = [m for m in st["moves"] if not np.array_equal(m["to"], new)]
        st["moves"] = [*pending, {"to": new.copy(), "move": move, "q": q}][-2:]


def control_step(opt: MARIGOLD, h: np.ndarray, at: np.ndarray) -> None:
    """Secant step control [R]: after a move ``delta`` of lam taken with slope
    ``q = h_before . delta < 0``, the new estimate at the arrival point gives
    ``p = h_after . delta``; along the move F is quadratic, so the best multiple of that move
    was ``sigma* = q / (q - p)``. The scale ``s`` of ``lr_weights`` is multiplied by
    ``sigma*`` clipped to [1/2, 2], and ``s`` is kept in [min_step_scale, 1]: the rule only
    ever damps the plain step (an overshoot, ``p > 0``, shrinks it; an undershoot lets it
    grow back)."""
    st = opt.balancer_state
    for i, m in enumerate(st["moves"]):
        if np.array_equal(m["to"], at):
            p, q = float(h @ m["move"]), float(m["q"])
            ratio = 2.0 if p <= q else q / (q - p)
            ratio = min(2.0, max(0.5, ratio))
            scale = float(st["step_scale"]) * ratio
            st["step_scale"] = min(1.0, max(opt.min_step_scale, scale))
            st["moves"] = st["moves"][i + 1 :]
            return
