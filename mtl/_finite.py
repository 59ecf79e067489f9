"""Finiteness of the gradients a step wrote, checked on the device (the ``found_inf`` pattern).

``torch.amp.GradScaler`` checks every gradient with fused device kernels and reads one flag at
``step()``. A balanced step does the same for the gradients it writes after its host transfer
(the trunk below the balance point, the heads, the shared parameters): :func:`nonfinite_flag`
reduces them to ONE flag without reading anything back, with the same fused kernel GradScaler
uses (``torch._amp_foreach_non_finite_check_and_unscale_`` with a scale of one: an exact
per-element test, no overflow of a norm, one launch per (device, dtype) group). Which parameters
were at fault is only worked out when the flag is set (:func:`nonfinite_params`, host reads on
that rare path only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["nonfinite_flag", "nonfinite_params"]


def _values(g: Tensor) -> Tensor:
    return g._values() if g.is_sparse else g


def nonfinite_flag(grads: Sequence[Tensor | None]) -> Tensor:
    """``(1,)`` float64 on the first gradient's device: positive when any of ``grads`` holds a
    NaN or an infinity, else 0. Sparse gradients are checked on their stored values; missing
    (``None``) and empty ones count as finite. No host synchronization.

    The kernel multiplies each gradient by its scale, here exactly one: values are unchanged.
    """
    present = [g for g in grads if g is not None]
    if not present:
        raise ValueError("nonfinite_flag needs at least one gradient")
    device = present[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in present:
        v = _values(g)
        if v.numel():
            groups.setdefault((v.device, v.dtype), []).append(v)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for (dev, _), values in groups.items():
        found = torch.zeros(1, dtype=torch.float32, device=dev)
        one = torch.ones(1, dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(values, found, one)
        total = total + found.to(device=device, dtype=torch.float64)
    return total


def nonfinite_params(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters whose ``.grad`` holds a NaN or an infinity (one host read per parameter:
    for the error message of a rejected step only)."""
    bad = []
    for p in params:
        g = p.grad
        if g is not None and _values(g).numel() and not bool(torch.isfinite(_values(g)).all()):
            bad.append(p)
    return bad
