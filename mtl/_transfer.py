"""The step's ONE host transfer: losses and Gram matrices reduced over the ranks on the device,
then copied to the host together (with whatever rides along: :func:`mtl._window.riders`).

Under DDP the representation rows of different ranks are disjoint coordinates of the global
batch, so the global Gram matrix is ``sum_r M_r / W^2``; parameter-level Gram matrices are of
already averaged gradients and are left alone. A float32 product that over- or underflowed is
redone with exact power-of-two row scaling: a second transfer, on such rare steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ._gram import rescaled_gram, suspect_rows
from ._host import to_host
from ._window import step_transfer

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = ["reduce_over_ranks", "transfer_grams"]


def reduce_over_ranks(
    opt: BalancedOptimizer, values: Tensor, block_grams: Tensor | None, gram_power: int = 2
) -> tuple[Tensor, Tensor | None]:
    """Global losses (mean over ranks) and Gram matrices (sum over ranks / W^2).

    With mean-reduced losses and DDP's averaged gradients, the global gradient of task k is
    the mean of the ranks' gradients, so its Gram matrix is sum_r M_r / W^2 (representation
    level). Gram matrices of already averaged gradients (parameter level) are the same on
    every rank: ``gram_power=0`` leaves them alone. One all-reduce, on the device.
    """
    active, group = opt._group()
    if not active:
        return values, block_grams
    world = dist.get_world_size(group)
    if block_grams is None or gram_power == 0:
        packed = values.clone()
        dist.all_reduce(packed, group=group)
        return packed / world, block_grams
    packed = torch.cat([values, block_grams.reshape(-1)])
    dist.all_reduce(packed, group=group)
    k = values.shape[0]
    return packed[:k] / world, packed[k:].reshape(block_grams.shape) / world**gram_power


def transfer_grams(
    opt: BalancedOptimizer,
    values: Tensor,
    block_grams: Tensor,
    rows: Sequence[Tensor],
    zero_rows: Sequence[set[int]],
    gram_power: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Reduce over ranks and copy the losses and Gram matrices to the host: ONE transfer.

    A float32 product that over- or underflowed (a diagonal entry infinite or below 1e-30
    for a row not known to be zero) is redone with exact power-of-two row scaling and read
    again: a second transfer, on such rare steps only.
    """
    reduced_values, reduced = reduce_over_ranks(opt, values, block_grams, gram_power)
    host_values, host_grams = step_transfer(opt, reduced_values, reduced)
    assert host_values is not None and host_grams is not None
    if not np.isfinite(host_values).all():
        return host_values, host_grams
    redo = [
        b
        for b in range(len(rows))
        if rows[b].dtype != torch.float64
        and set(suspect_rows(np.diagonal(host_grams[b]).tolist())) - zero_rows[b]
    ]
    if redo:
        fixed = torch.stack(
            [rescaled_gram(r) if b in redo else block_grams[b] for b, r in enumerate(rows)]
        )
        if gram_power:  # the losses were reduced above; only the Gram matrices again
            _, reduced_fixed = reduce_over_ranks(opt, values.new_zeros(0), fixed, gram_power)
            assert reduced_fixed is not None
            fixed = reduced_fixed
        (host_grams,) = to_host(fixed)
        assert host_grams is not None
    return host_values, host_grams
