"""The environment a balancer re-runs a user's loss closure in, inside its own step.

FAMO re-evaluates the losses after the model update and MARIGOLD at shifted points; both run the
closure under the autocast of the forward it re-evaluates (:func:`replay_autocast`, from what
:func:`mtl._autocast.forward_autocast` recorded at ``backward``) and fork the random state of the
CPU and of the CUDA devices that hold the model's tensors (:func:`cuda_indices`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["cuda_indices", "replay_autocast"]


@contextlib.contextmanager
def replay_autocast(amp: Iterable[tuple[str, torch.dtype]]) -> Iterator[None]:
    """Enter ``torch.autocast(device_type, dtype)`` for each recorded pair, in order."""
    with contextlib.ExitStack() as stack:
        for device_type, dtype in amp:
            stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype))
        yield


def cuda_indices(tensors: Iterable[Tensor]) -> list[int]:
    """The sorted indices of the CUDA devices holding ``tensors`` (the current device for a
    tensor on ``"cuda"`` without an index)."""
    idx = set()
    for t in tensors:
        if t.device.type == "cuda":
            idx.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return sorted(idx)
