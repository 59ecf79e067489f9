"""Host-side helpers: the balancers' math runs in float64 NumPy on one host copy per step.

The engine copies the losses and the Gram matrices to the host once per balanced step and calls
``_compute_weights`` with NumPy arrays; every method's math and every decision then run on that
copy, without touching the device again. The public pure functions keep their torch interface:
they bring their inputs to the host with :func:`host_array` and hand results back with
:func:`to_torch`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_gram", "device_of", "host_array", "host_gram", "to_torch"]


def host_array(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """``x`` (a tensor on any device, an array, a sequence or a number) as a host NumPy array.

    A tensor costs one device-to-host copy; the balancers' ``_compute_weights`` receive arrays
    from the engine and never reach this branch (it keeps a tensor-passing caller working).
    """
    if isinstance(x, Tensor):
        t = x.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(torch.float64)
        x = t.cpu().numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def device_of(x: Any) -> torch.device:
    """Where a public function's result goes: the input tensor's device, else the CPU."""
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def to_torch(a: Any, device: torch.device | None = None) -> Tensor:
    """A host array (or NumPy scalar) as a tensor sharing its memory, moved to ``device`` if given."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device is None or device.type == "cpu" else t.to(device)


def check_gram(m: np.ndarray) -> np.ndarray:
    """A validated, symmetrised float64 copy of a host ``(K, K)`` Gram matrix.

    The one Gram validator of the balancers (MGDA's solver, GradOPS, PCGrad, MultiBalance's
    ``rule="mgda"``).

    Raises:
        ValueError: ``m`` is not a non-empty square matrix, or has a NaN or infinite entry.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square (K, K) matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("gram contains NaN or infinite entries")
    sym: np.ndarray = 0.5 * (m + m.T)
    return sym


def host_gram(gram: Any) -> tuple[np.ndarray, torch.device]:
    """:func:`check_gram` of ``gram`` (a tensor on any device, or an array) brought to the host,
    and the device a public function's results go to (``gram``'s, CPU for an array)."""
    return check_gram(host_array(gram)), device_of(gram)
