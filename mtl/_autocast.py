"""A balanced step under ``torch.autocast``: its own arithmetic in full precision.

Under ``torch.autocast`` a matmul runs in bfloat16/float16: a Gram matrix with 3e-3 relative
error, a combined gradient of the wrong dtype for a float32 ``.grad``. The step's arithmetic
(Gram products, combinations) therefore runs with autocast off (:func:`autocast_off`); the
user's backward passes are unaffected (they replay the dtypes of the forward). A closure that
re-evaluates the losses (MARIGOLD's finite differences) must see the forward's precision again:
:func:`forward_autocast` says which autocast to re-enter for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["autocast_off", "forward_autocast"]

_LOW = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def autocast_off(device_types: set[str]) -> Iterator[None]:
    """Disable every autocast that is on for ``device_types`` (and the CPU) inside the block."""
    with contextlib.ExitStack() as stack:
        for device_type in sorted(device_types | {"cpu"}):
            if torch.is_autocast_enabled(device_type):  # per device type from torch 2.4 on
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def _autocast_dtype(device_type: str) -> torch.dtype:
    getter = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4
    if getter is not None:
        return getter(device_type)  # type: ignore[no-any-return]
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.bfloat16


def forward_autocast(
    device_types: set[str], blocks: Sequence[Tensor] = ()
) -> list[tuple[str, torch.dtype]]:
    """``(device_type, dtype)`` of the autocast a closure should run under: the caller's
    current autocast, or, when none is on, the dtype of a bfloat16/float16 balance point (the
    forward ran under an autocast that has since been exited, as ``torch.amp`` recommends for
    the backward)."""
    on = [
        (d, _autocast_dtype(d))
        for d in sorted(device_types | {"cpu"})
        if torch.is_autocast_enabled(d)
    ]
    if on:
        return on
    return sorted({(z.device.type, z.dtype) for z in blocks if z.dtype in _LOW}, key=str)
