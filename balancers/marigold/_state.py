"""MARIGOLD's state [R]: its initial value, its host form and its checkpoint round trip.

``balancer_state`` holds ``lam`` (``weights``; ``logits`` with the softmax parametrization), the
number of updates, the secant step control's scale and pending moves, and the amortized
estimator's previous call. Its vectors live on the host as float64 NumPy arrays
(:func:`host_state` converts tensors put there from outside); a checkpoint stores them as CPU
float64 tensors, plus the gaussian estimator's generator state, and a load checks everything
before it replaces anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .._rng import rng_from_state, rng_from_torch_state
from ._functional import _check_lam, _host_vector, _to_numpy_tree, _to_torch_tree

if TYPE_CHECKING:
    from ._optimizer import MARIGOLD


def init_state(st: dict[str, Any], k: int, parametrization: str) -> None:
    """Fill an empty state for ``k`` tasks (uniform lam); a state with weights is kept."""
    if "weights" in st:
        return
    st["parametrization"] = parametrization
    st["weights"] = np.full(k, 1.0 / k)
    if parametrization == "softmax":
        st["logits"] = np.zeros(k)
    st["num_updates"] = 0
    st["step_scale"] = 1.0  # secant step control: multiplier of lr_weights
    st["moves"] = []  # secant step control: the last weight moves awaiting their check
    st["previous"] = None  # amortized: losses, lr and |g|^2 of the previous call


def host_state(st: dict[str, Any]) -> dict[str, Any]:
    """The balancer state, its vectors as float64 NumPy arrays on the host.

    MARIGOLD keeps ``lam`` and its history on the host (the weight update is host math on the
    step's one transfer). A tensor put into ``balancer_state`` from outside (a user, an
    older pickled optimizer) is copied to the host here, once.
    """
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


def balancer_state_dict(opt: MARIGOLD) -> dict[str, Any]:
    """The state for a checkpoint (``MARIGOLD._balancer_state_dict``)."""
    # the host arrays are saved as CPU float64 tensors (the checkpoint format is unchanged
    # and loads with torch.load(weights_only=True)); the round trip is exact
    st: dict[str, Any] = _to_torch_tree(dict(opt._state()))
    if opt.estimator == "gaussian":
        # a plain dict of str and int (PCG64's 128-bit state and increment)
        st["rng_state"] = opt._generator.bit_generator.state
    return st


def load_balancer_state(opt: MARIGOLD, state: dict[str, Any]) -> None:
    """Checks everything first (parametrization, lam on its domain, the generator), then
    replaces the state: a rejected state leaves the optimizer as it was."""
    state = _to_numpy_tree(dict(state))
    rng = state.pop("rng_state", None)
    saved = state.get("parametrization")
    if saved is not None and saved != opt.parametrization:
        raise ValueError(
            f"state_dict was saved with parametrization={saved!r}, this optimizer uses "
            f"{opt.parametrization!r}"
        )
    if "weights" in state:
        _check_lam(state, opt.parametrization, opt.num_tasks)
    generator = opt._generator
    if isinstance(rng, np.ndarray):  # an older checkpoint's torch.Generator state
        generator = rng_from_torch_state(torch.from_numpy(rng.astype(np.uint8)), "MARIGOLD")
    elif rng is not None:
        generator = rng_from_state(rng, "MARIGOLD")
    opt.balancer_state = state
    opt._generator = generator
