"""Finiteness of the gradients a step wrote, checked on the device (the ``found_inf`` pattern).

``torch.amp.GradScaler`` checks every gradient with fused device kernels and reads one flag at
``step()``. A balanced step does the same for the gradients it writes after its host transfer
(the trunk below the balance point, the heads, the shared parameters): :func:`nonfinite_flags`
reduces them to one ``0/1`` entry per parameter without reading anything back, and
:meth:`mtl.BalancedOptimizer.step` reads that vector once before it steps the inner optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["nonfinite_flags"]


def _dense_values(g: Tensor) -> Tensor:
    return g._values() if g.is_sparse else g


def nonfinite_flags(grads: Sequence[Tensor | None]) -> Tensor:
    """``(len(grads),)`` float64 flags on the first gradient's device: 1 where a gradient holds a
    NaN or an infinity, else 0.

    One fused infinity-norm per (device, dtype) group (``torch._foreach_norm``; NaN and inf
    propagate through a max, and unlike a sum a max never overflows). Sparse gradients are
    checked on their stored values; empty and missing (``None``) ones count as finite. No host
    synchronization.
    """
    present = [g for g in grads if g is not None]
    if not present:
        raise ValueError("nonfinite_flags needs at least one gradient")
    device = present[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    parts: list[Tensor] = [zero] * len(grads)
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
    for i, g in enumerate(grads):
        v = None if g is None else _dense_values(g)
        if v is not None and v.numel():
            groups.setdefault((v.device, v.dtype), []).append((i, v))
    for members in groups.values():
        norms = torch._foreach_norm([v for _, v in members], float("inf"))
        bad = (~torch.isfinite(torch.stack(norms))).to(device=device, dtype=torch.float64)
        for j, (i, _) in enumerate(members):
            parts[i] = bad[j]
    return torch.stack(parts)
