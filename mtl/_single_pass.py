"""Steps that need ONE ordinary backward and no per-task gradient.

*Plain*: weights known before any backward (EqualWeight), so one backward of ``sum_k c_k L_k``;
the losses and the finiteness of every written gradient reach the host in one transfer after it.
*Loss level*: weights that are a function of the losses (UW, DWA, RLW, GLS, FAMO), so the losses
reach the host first (one transfer), then one weighted backward; its gradients are checked at
``step()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from ._checks import check_reached
from ._combine import register_grad_hook, sum_backward
from ._finite import nonfinite_flag
from ._graph import depends_on
from ._info import BalanceInfo
from ._transfer import reduce_over_ranks
from ._verdict import decide
from ._weights import balance_info, host_weights
from ._window import close_window, step_transfer

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = ["backward_losses", "backward_plain"]


def _check_reached(
    opt: BalancedOptimizer,
    losses: list[Tensor],
    blocks: list[Tensor],
    level: Literal["representation", "parameters"],
) -> None:
    """Every loss reaches the balance point (representation level: one walk of the graph that
    also checks the trunk; parameter level: some shared parameter)."""
    if level == "representation":
        opt._analyse(losses, blocks)
    else:
        check_reached(depends_on(losses, blocks), opt._name, parameters=True)


def backward_plain(
    opt: BalancedOptimizer,
    losses: list[Tensor],
    values: Tensor,
    blocks: list[Tensor],
    level: Literal["representation", "parameters"],
) -> BalanceInfo:
    """One plain backward of ``sum_k c_k L_k``, for weights known without any gradient.

    Still checks that every loss reaches the balance point (a walk of the autograd graph)
    and that the gradient arriving at the balance point (representation level: a tensor
    hook; parameter level: the shared ``.grad``) is finite. The losses and that finiteness
    flag reach the host in one transfer, after the backward.
    """
    _check_reached(opt, losses, blocks, level)
    # the weights depend on neither gradients nor losses (see _plain_backward_is_exact)
    weights, _, extras = host_weights(opt, np.ones(len(losses)), None, len(blocks))
    flags: list[Tensor] = []
    handles = []
    if level == "representation":

        def check(grad: Tensor) -> None:
            # the incoming gradient is autograd's own tensor: read it, never scale it in place
            flags.append((~torch.isfinite(grad).all()).to(torch.float64).reshape(1))

        handles = [register_grad_hook(z, check) for z in blocks]
    try:
        sum_backward(losses, [float(c) for c in weights])
    finally:
        for h in handles:
            h.remove()
    # every gradient the backward wrote, and the one arriving at the balance point
    grads = [p.grad for p in opt._params()]
    if any(g is not None for g in grads):
        flags.append(nonfinite_flag(grads))
    bad = torch.cat(flags).amax().reshape(1) if flags else values.new_zeros(1)
    # one collective and one transfer: the flag travels with the losses (a mean over ranks
    # is positive when any rank saw a non-finite gradient)
    packed, _ = reduce_over_ranks(opt, torch.cat([values, bad]), None)
    (host,) = step_transfer(opt, packed)
    assert host is not None
    k = values.shape[0]
    verdict = decide(opt, level, host[:k], None, bool(host[k] == 0.0))
    if verdict is not None:
        return verdict
    opt._window = None  # checked within this backward's transfer
    return balance_info(opt, level, weights, host[:k], None, None, extras)


def backward_losses(
    opt: BalancedOptimizer,
    losses: list[Tensor],
    values: Tensor,
    blocks: list[Tensor],
    level: Literal["representation", "parameters"],
) -> BalanceInfo:
    """A loss-level method: the losses reach the host (ONE transfer, before any gradient
    is written, so a non-finite loss leaves ``.grad`` alone), the weights are computed
    there, and ONE backward of ``sum_k c_k L_k`` writes every gradient; those are checked
    on the device and read at :meth:`step` (or by a fused optimizer)."""
    _check_reached(opt, losses, blocks, level)
    reduced, _ = reduce_over_ranks(opt, values, None)
    (host_values,) = step_transfer(opt, reduced)
    assert host_values is not None
    verdict = decide(opt, level, host_values, None)
    if verdict is not None:
        return verdict
    weights, _, extras = host_weights(opt, host_values, None, 1)
    sum_backward(losses, [float(c) for c in weights])
    close_window(opt)
    return balance_info(opt, level, weights, host_values, None, None, extras)
