"""Euclidean projection onto the probability simplex (Duchi et al. 2008).

The sort-and-threshold projection used by the balancers whose weights live on the simplex
(MARIGOLD's projected step, MultiBalance-S): :func:`project_simplex` projects a tensor where it
lives (no host synchronisation) and :func:`_project_simplex_np` does the same on a host array.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["project_simplex"]


def project_simplex(y: Tensor | np.ndarray) -> Tensor:
    """Euclidean projection of a vector onto the probability simplex (Duchi et al. 2008).

    Sort ``y`` descending into ``u``, find the largest ``rho`` with
    ``u_rho - (sum_{j<=rho} u_j - 1)/rho > 0`` and return ``max(y - tau, 0)`` with
    ``tau = (sum_{j<=rho} u_j - 1)/rho``.

    A tensor is projected where it lives, without a host synchronisation (``rho`` stays a
    tensor), in its own dtype; a NumPy array goes through :func:`_project_simplex_np` and comes
    back as a CPU tensor.
    """
    if not isinstance(y, Tensor):
        return torch.from_numpy(_project_simplex_np(np.asarray(y)))
    if y.dim() != 1 or y.numel() == 0:
        raise ValueError(
            f"project_simplex expects a non-empty 1-D tensor, got shape {tuple(y.shape)}"
        )
    u, _ = torch.sort(y, descending=True)
    css = torch.cumsum(u, 0) - 1
    idx = torch.arange(1, y.numel() + 1, dtype=y.dtype, device=y.device)
    cond = u - css / idx > 0  # true exactly up to rho (cond[0] = (1 > 0) in exact arithmetic)
    rho = torch.where(cond, idx, torch.ones_like(idx)).amax()  # >= 1 even after round-off
    tau = css.gather(0, (rho - 1).to(torch.int64).reshape(1)) / rho
    return torch.clamp(y - tau, min=0)


def _project_simplex_np(y: np.ndarray) -> np.ndarray:
    """:func:`project_simplex` on the host (float64 unless ``y`` is already floating point)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"project_simplex expects a non-empty 1-D tensor, got shape {y.shape}")
    u = np.sort(y)[::-1]
    css = np.cumsum(u) - 1
    idx = np.arange(1, y.size + 1, dtype=y.dtype)
    rho = int(np.max(np.flatnonzero(u - css / idx > 0), initial=0)) + 1
    tau = css[rho - 1] / rho
    out: np.ndarray = np.clip(y - tau, 0, None)
    return out
