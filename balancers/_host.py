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

__all__ = ["device_of", "host_array", "to_torch"]


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
