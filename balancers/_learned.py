"""Learnable balancer state (UW's log-variances, DWA's history, RLW's generator, FAMO's logits,
GradNorm's weights, MultiBalanceS's averages, NashMTL's last solution): checks of a saved state,
which run before anything is replaced (a rejected checkpoint changes nothing), the Adam step some
methods take on it, and two base classes: :class:`LearnedStateBalancer` (``reset_state`` and
copies of the state) and :class:`HostVectorBalancer` (a state of ``(K,)`` host vectors, with its
checkpoint format and checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mtl import BalancedOptimizer

from ._host import host_array

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "HostVectorBalancer",
    "LearnedStateBalancer",
    "adam_step",
    "check_adam_state",
    "check_keys",
    "check_learned_state",
    "check_state_keys",
    "count",
    "finite_vector",
    "float_list",
    "host_vectors",
    "loss_level_kwargs",
    "state_vector",
]


ADAM_EPS = 1e-8


#: Adam's constants (those of ``torch.optim.Adam``)
ADAM_BETAS = (0.9, 0.999)


def adam_step(
    param: Any,
    grad: Any,
    state: Mapping[str, Any] | None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One step of ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient, not
    decoupled) on a host vector; returns ``(new_param, new_state)`` and mutates nothing.

    ``state`` is ``None`` (first step) or ``{"step": int, "exp_avg": list, "exp_avg_sq": list}``::

        g = grad + weight_decay * param;  t = step + 1
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    p = np.asarray(param, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64) + weight_decay * p
    b1, b2 = betas
    if state is None:
        t, m, v = 0, np.zeros_like(p), np.zeros_like(p)
    else:
        t = int(state["step"])
        m = np.asarray(state["exp_avg"], dtype=np.float64)
        v = np.asarray(state["exp_avg_sq"], dtype=np.float64)
    t += 1
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1.0 - b2**t) + eps
    new = p - (lr / (1.0 - b1**t)) * m / denom
    return new, {"step": t, "exp_avg": m.tolist(), "exp_avg_sq": v.tolist()}


def loss_level_kwargs(kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    """The base-class options of a loss-level method: ``weight_heads`` is ``True``.

    The loss-level step is ONE backward of ``sum_k c_k L_k`` (heads included, as in the
    papers); with ``compute_gram=True`` the engine takes the Gram path instead, and
    ``weight_heads=True`` makes that path write the same gradients. ``weight_heads=False`` would
    give the heads different gradients depending on ``compute_gram``: refused.
    """
    if kwargs.get("weight_heads", True) is not True:
        raise ValueError(
            f"{owner} is a loss-level method: its step is one backward of sum_k c_k L_k, so the "
            f"heads always receive c_k * grad L_k; weight_heads={kwargs['weight_heads']!r} is not "
            "supported (omit it)"
        )
    return {**kwargs, "weight_heads": True}


def float_list(value: Any, key: str, owner: str, k: int | None) -> list[float]:
    """A checkpointed vector as a list of finite floats of length ``k`` (when known).

    Raises:
        ValueError: naming ``key``: not a 1-D sequence/array/tensor of finite numbers of length ``k``.
    """
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()  # load_state_dict only (never inside a step)
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{owner} state {key!r} must be a 1-D sequence of numbers, got {value!r}")
    out = [float(v) for v in value]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{owner} state {key!r} must be finite, got {out}")
    if k is not None and len(out) != k:
        raise ValueError(f"{owner} state {key!r} has {len(out)} entries, expected K={k}")
    return out


def count(value: Any, key: str, owner: str) -> int:
    """A checkpointed counter: an int >= 0 (ValueError naming ``key`` otherwise)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())  # load_state_dict only
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner} state {key!r} must be an int >= 0, got {value!r}")
    return value


def check_keys(state: Any, allowed: Sequence[str], owner: str) -> dict[str, Any]:
    """``state`` as a dict with no key outside ``allowed`` (TypeError/ValueError otherwise)."""
    if not isinstance(state, dict):
        raise TypeError(f"{owner} state must be a dict, got {type(state).__name__}")
    unknown = sorted(str(key) for key in state if key not in allowed)
    if unknown:
        raise ValueError(f"{owner} state has unknown keys {unknown}; expected {list(allowed)}")
    return state


def check_adam_state(value: Any, key: str, owner: str, k: int | None) -> dict[str, Any]:
    """A checkpointed :func:`adam_step` state (ValueError naming ``key`` otherwise)."""
    if not isinstance(value, dict) or set(value) != {"step", "exp_avg", "exp_avg_sq"}:
        raise ValueError(
            f"{owner} state {key!r} must be a dict with keys 'step', 'exp_avg', 'exp_avg_sq'"
        )
    sq = float_list(value["exp_avg_sq"], f"{key}.exp_avg_sq", owner, k)
    if any(v < 0 for v in sq):
        raise ValueError(f"{owner} state '{key}.exp_avg_sq' must be >= 0")
    return {
        "step": count(value["step"], f"{key}.step", owner),
        "exp_avg": float_list(value["exp_avg"], f"{key}.exp_avg", owner, k),
        "exp_avg_sq": sq,
    }


def check_state_keys(state: Any, keys: Sequence[str], owner: str) -> bool:
    """``state`` is a dict with every key of ``keys`` and no other, or empty (nothing learned
    yet: returns ``False``); TypeError/ValueError naming the keys otherwise."""
    state = check_keys(state, keys, owner)
    if not state:
        return False
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{owner} state is missing the keys {missing}")
    return True


def state_vector(value: Any, key: str, owner: str, k: int | None) -> np.ndarray:
    """A saved ``(K,)`` float vector (length ``k`` when known, finite) as a float64 host copy;
    ValueError naming ``key`` otherwise."""
    try:
        a = np.array(host_array(value), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{owner} state {key!r} must be a (K,) float vector") from None
    if a.ndim != 1 or a.size == 0 or (k is not None and a.size != k):
        want = "K" if k is None else str(k)
        raise ValueError(f"{owner} state {key!r} must have shape ({want},), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{owner} state {key!r} must be finite, got {a.tolist()}")
    return a


def host_vectors(
    state: Any, keys: Sequence[str], num_tasks: int | None, owner: str
) -> dict[str, np.ndarray] | None:
    """A saved state of ``(K,)`` float vectors under exactly ``keys``, checked (a dict, no unknown
    or missing key, one shape ``(K,)`` for all, finite) and copied to float64 host arrays;
    ``None`` for an empty state (nothing learned yet)."""
    if not check_state_keys(state, keys, owner):
        return None
    k = num_tasks
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        arrays[key] = state_vector(state[key], key, owner, k)
        k = arrays[key].size
    return arrays


def finite_vector(x: Any, name: str, k: int) -> np.ndarray:
    """An argument ``x`` of a public function as a finite float64 host vector of length ``k``
    (ValueError naming ``name``)."""
    try:
        a = np.array(host_array(x), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {k} finite numbers, got {x!r}") from None
    if a.shape != (k,) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be {k} finite numbers, got {a.tolist()}")
    return a


def check_learned_state(
    state: Any,
    keys: Sequence[str],
    owner: str,
    k: int | None,
    *,
    vector: str,
    counts: Sequence[str],
    update: str,
) -> tuple[dict[str, Any], int | None]:
    """The entries the loss-level methods with an optional Adam update share (UW, FAMO),
    checked before anything is replaced: no key outside ``keys``, the learned ``vector`` (K
    finite floats), the ``counts`` (ints >= 0) and ``adam`` (:func:`check_adam_state`; only
    with ``update="adam"``; ``None`` kept). Entries that are absent stay absent.

    Returns:
        ``(entries, k)``: the checked entries and K (from ``vector`` when the caller's ``k``
        was ``None``).
    """
    state = check_keys(state, keys, owner)
    new: dict[str, Any] = {}
    if vector in state:
        new[vector] = float_list(state[vector], vector, owner, k)
        k = len(new[vector])
    for key in counts:
        if key in state:
            new[key] = count(state[key], key, owner)
    if state.get("adam") is not None:
        if update != "adam":
            raise ValueError(
                f"{owner} state 'adam' was saved with update='adam'; this {owner} uses {update!r}"
            )
        new["adam"] = check_adam_state(state["adam"], "adam", owner, k)
    elif "adam" in state:
        new["adam"] = None
    return new, k


# ---------------------------------------------------------------------- base classes
class LearnedStateBalancer(BalancedOptimizer):
    """A balancer that learns across steps and keeps it all in ``balancer_state`` (UW, FAMO,
    NashMTL, GradNorm, MultiBalanceS): :meth:`reset_state` and read-only copies of the state."""

    def reset_state(self) -> None:
        """Forget what was learned: the next step starts from the initial state (the class's
        "State" paragraph says what that is); the options are kept."""
        self.balancer_state = {}

    def _state_copy(self, key: str) -> np.ndarray | None:
        """A float64 host copy of the state vector ``key``, or ``None`` before the first step."""
        v = self.balancer_state.get(key)
        return None if v is None else np.array(host_array(v), dtype=np.float64)

    def _known_num_tasks(self) -> int:
        """K, or RuntimeError while it is not known (no ``num_tasks=`` and no step yet)."""
        if self.num_tasks is None:
            raise RuntimeError("the number of tasks is not known yet (pass num_tasks=)")
        return self.num_tasks


class HostVectorBalancer(LearnedStateBalancer):
    """A balancer whose whole state is ``(K,)`` float64 NumPy vectors under ``_STATE_KEYS``
    (GradNorm, MultiBalanceS): read without any device access, checkpointed as CPU float64
    tensors (loadable with ``torch.load(weights_only=True)``), and a loaded state is checked
    completely (:func:`host_vectors`, then :meth:`_check_state`) before it replaces the
    current one, so a rejected state changes nothing."""

    _STATE_KEYS: ClassVar[tuple[str, ...]] = ()

    def _balancer_state_dict(self) -> dict[str, Any]:
        # the engine clones what this returns
        return {key: torch.as_tensor(np.asarray(v)) for key, v in self.balancer_state.items()}

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        arrays = host_vectors(state, self._STATE_KEYS, self.num_tasks, type(self).__name__)
        if arrays is not None:
            self._check_state(arrays)
        self.balancer_state = {} if arrays is None else dict(arrays)

    def _saved_vectors(self, k: int) -> list[np.ndarray] | None:
        """The state's vectors in ``_STATE_KEYS`` order as float64 host arrays (no device
        read), or ``None`` before the first step; ValueError when they are for another K."""
        st = self.balancer_state
        if any(key not in st for key in self._STATE_KEYS):
            return None
        vectors = [host_array(st[key]) for key in self._STATE_KEYS]
        if any(v.shape != (k,) for v in vectors):
            raise ValueError(
                f"{type(self).__name__} state is for {vectors[0].shape[0]} tasks, this step has {k}"
            )
        return vectors

    def _check_state(self, arrays: dict[str, np.ndarray]) -> None:
        """The method's own conditions on a loaded state (ValueError); shapes and finiteness
        are checked already."""
