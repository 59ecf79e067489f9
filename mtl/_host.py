"""The one device-to-host transfer of a balanced step, and the way back.

A balanced step computes the task losses and the K x K Gram matrices on the device; the methods'
math (exact min-norm solvers, moving averages, projections) and every decision (skip or raise,
fallbacks) are small and branchy, so they run on the host in float64 NumPy. :func:`to_host` packs
what the host needs into one tensor and copies it with ONE synchronization; :func:`to_device`
sends the coefficients back without waiting for the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_device", "to_host"]


def to_host(*parts: Tensor | None) -> list[np.ndarray | None]:
    """Float64 NumPy copies of ``parts`` (``None`` passes through), from ONE device transfer."""
    present = [p for p in parts if p is not None]
    if not present:
        return [None for _ in parts]
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in present])
    host = flat.numpy(force=True)  # the step's one synchronization on a GPU
    out: list[np.ndarray | None] = []
    offset = 0
    for p in parts:
        if p is None:
            out.append(None)
            continue
        n = math.prod(p.shape)
        out.append(host[offset : offset + n].reshape(tuple(p.shape)))
        offset += n
    return out


def to_device(
    values: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``values`` on ``device`` without waiting: from pinned memory, asynchronously, on CUDA."""
    t = torch.from_numpy(np.array(values, dtype=np.float64))  # a private, writable copy
    if device.type == "cpu":
        return t if dtype == torch.float64 else t.to(dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)
