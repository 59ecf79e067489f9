"""Host random generators shared by the balancers that draw random numbers (PCGrad, MARIGOLD).

The balancers draw on the host from ``numpy.random.Generator(PCG64(seed))`` so that drawing never
touches the device; the bit generator's state (a dict of Python ints) is what their
``state_dict`` stores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["pcg64", "rng_from_state", "rng_from_torch_state"]


def pcg64(seed: int) -> np.random.Generator:
    """``numpy.random.Generator(PCG64(seed))``."""
    return np.random.Generator(np.random.PCG64(seed))


def rng_from_state(state: Any, owner: str) -> np.random.Generator:
    """A PCG64 generator restored from a saved bit-generator state dict.

    ``owner`` names the balancer in the error messages.

    Raises:
        ValueError: ``state`` is not a valid PCG64 state dict.
    """
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        got = (
            f"a state dict for {state.get('bit_generator')!r}"
            if isinstance(state, dict)
            else type(state).__name__
        )
        raise ValueError(f"{owner} state_dict needs a numpy PCG64 generator state, got {got}")
    rng = np.random.Generator(np.random.PCG64())
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{owner} state_dict has an invalid PCG64 state: {exc}") from None
    return rng


def rng_from_torch_state(state: Tensor, owner: str = "PCGrad") -> np.random.Generator:
    """A PCG64 generator seeded with 128 bits drawn from a saved ``torch.Generator`` state.

    For checkpoints written when a balancer still drew from a ``torch.Generator``: training
    continues deterministically, with different draws than the torch generator would have made.

    Raises:
        ValueError: ``state`` is not a ``torch.Generator`` state.
    """
    g = torch.Generator()
    try:
        g.set_state(state.detach().cpu().to(torch.uint8))
    except RuntimeError as exc:
        raise ValueError(
            f"{owner} state_dict holds a torch generator state that cannot be restored: {exc}"
        ) from None
    words = torch.randint(0, 2**32, (4,), generator=g, dtype=torch.int64).tolist()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))
