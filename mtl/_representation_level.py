"""The representation-level step: per-task gradients at the balance point, their Gram matrix,
ONE host transfer, and the combination through ONE trunk backward.

``h_k = dL_k/dz`` through the heads only (K cheap passes, or one batched pass), copied into a
``(K, numel)`` matrix per block; the trunk then receives ``sum_k c_k h_k`` (a trunk-only
backward when the heads are disjoint from it, else one backward with a hook on ``z``).

For a ``z`` that DDP's sink returned, the gradients are taken, and the hook placed, at the edge
into the node that computed the sink's input (:mod:`mtl._ddp`); the per-task passes keep the
sink from queueing DDP's delayed all-reduce (``static_graph=True``, first iteration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._combine import accumulate_head_grads, register_grad_hook, replace_grad, sum_backward
from ._ddp import Target, quiet_sinks
from ._gram import device_gram
from ._host import to_device
from ._info import BalanceInfo
from ._transfer import transfer_grams
from ._verdict import decide
from ._weights import balance_info, block_weights, head_coefficients, host_weights
from ._window import close_window

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = ["backward_representation", "representation_rows", "row_buffers"]


def representation_rows(
    opt: BalancedOptimizer,
    losses: list[Tensor],
    blocks: list[Tensor],
    heads: Sequence[Sequence[Tensor]] | None = None,
    targets: Sequence[Target] | None = None,
) -> tuple[list[Tensor], list[tuple[Tensor | None, ...]], list[set[int]]]:
    """``rows[b][k] = dL_k / d blocks[b]`` (flattened, one ``(K, numel)`` matrix per block),
    ``head_grads[k][i] = dL_k / d heads[k][i]`` (the parameters task k reaches above the
    blocks; only with ``grad_mode="loop"``) and, per block, the tasks whose row is zero
    because their loss does not reach that block. The gradients are taken at ``targets``
    (default: the blocks; see :func:`mtl._ddp.resolve_blocks`).

    Loop mode copies each task's gradient into its row as soon as it is computed (while it
    is still in cache) and drops it: no K live gradient tensors and no final stack.
    """
    k_tasks = len(losses)
    # torch's stub takes tensors or edges, not a mix (the call does)
    at: list[Any] = list(blocks) if targets is None else list(targets)
    if opt.grad_mode == "batched":
        stacked = torch.stack(losses)
        eye = torch.eye(k_tasks, dtype=stacked.dtype, device=stacked.device)
        per_block = torch.autograd.grad(
            stacked,
            at,
            grad_outputs=eye,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        rows = [
            z.new_zeros(k_tasks, z.numel()) if g is None else g.reshape(k_tasks, -1)
            for z, g in zip(blocks, per_block)
        ]
        unreached: list[set[int]] = [set(range(k_tasks)) if g is None else set() for g in per_block]
        return rows, [], unreached
    rows = row_buffers(opt, k_tasks, [(z.numel(), z.dtype, z.device) for z in blocks])
    head_grads: list[tuple[Tensor | None, ...]] = []
    zeros: list[set[int]] = [set() for _ in blocks]
    n = len(blocks)
    for k, loss in enumerate(losses):
        inputs = [*at, *heads[k]] if heads is not None else at
        gs = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        for b, g in enumerate(gs[:n]):
            if g is None:
                rows[b][k].zero_()
                zeros[b].add(k)
            else:
                rows[b][k].copy_(g.reshape(-1))
        head_grads.append(gs[n:])
        del gs
    return rows, head_grads, zeros


def row_buffers(
    opt: BalancedOptimizer, k: int, shapes: Sequence[tuple[int, torch.dtype, torch.device]]
) -> list[Tensor]:
    """``(K, numel)`` gradient matrices for blocks of ``(numel, dtype, device)``, kept from
    one step to the next while the shapes do not change: a fresh K x B x d buffer every step
    costs a page fault per 4 KiB page on first touch (K=16, 1 MiB per task: the copies took
    7.3 ms instead of 1.5 ms). The buffer is the one the step needs at its peak anyway; it
    is not part of the state_dict.
    """
    key = [(k, *shape) for shape in shapes]
    if opt._rows_cache is None or opt._rows_cache[0] != key:
        opt._rows_cache = None  # free the old buffer before allocating the new one
        buffers = [torch.empty(k, n, dtype=dtype, device=device) for n, dtype, device in shapes]
        opt._rows_cache = (key, buffers)
    return opt._rows_cache[1]


def backward_representation(
    opt: BalancedOptimizer, losses: list[Tensor], values: Tensor, blocks: list[Tensor]
) -> BalanceInfo:
    analysis = opt._analyse(losses, blocks)
    # heads disjoint from the trunk: one pass per task gives both its representation gradient
    # and its heads' gradients, and the final backward runs through the trunk only
    heads = opt._split_heads(analysis)
    with quiet_sinks(analysis.sinks):
        rows, head_grads, zeros = representation_rows(opt, losses, blocks, heads, analysis.targets)
    grams = torch.stack([device_gram(r) for r in rows])
    host_values, host_grams = transfer_grams(opt, values, grams, rows, zeros)
    verdict = decide(opt, "representation", host_values, host_grams)
    if verdict is not None:
        return verdict
    weights, gram, extras = host_weights(opt, host_values, host_grams, len(blocks))
    bw = to_device(block_weights(weights, len(blocks)), rows[0].device)
    combined = [(bw[b].to(rows[b].dtype) @ rows[b]).view_as(blocks[b]) for b in range(len(blocks))]
    coef = head_coefficients(weights, opt.weight_heads)
    if heads is not None:
        torch.autograd.backward(blocks, grad_tensors=combined)  # the trunk only
        accumulate_head_grads(heads, head_grads, coef)
    else:
        handles = [_replace_at(t, c) for t, c in zip(analysis.targets, combined)]
        try:
            sum_backward(losses, coef)
        finally:
            for h in handles:
                h.remove()
    close_window(opt)
    return balance_info(
        opt,
        "representation",
        weights,
        host_values,
        gram,
        host_grams if len(blocks) > 1 else None,
        extras,
    )


def _replace_at(target: Target, grad: Tensor) -> RemovableHandle:
    """A hook that replaces the gradient arriving at ``target`` by ``grad``: a tensor hook, or,
    at a gradient edge, a pre-hook on its node that replaces that output's gradient."""
    if isinstance(target, Tensor):
        return register_grad_hook(target, replace_grad(grad))
    nr = target.output_nr

    def hook(grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        return (*grad_outputs[:nr], grad, *grad_outputs[nr + 1 :])

    register: Callable[..., RemovableHandle] = target.node.register_prehook
    return register(hook)
