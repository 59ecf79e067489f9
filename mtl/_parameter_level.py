"""The parameter-level step: per-task gradients of the shared parameters (K backward passes)
copied once into gradient matrices, their Gram matrices, ONE host transfer, and ``sum_k c_k g_k``
written into the shared ``.grad`` (directly, or through one backward with parameter hooks under
DDP). On a ``static_graph=True`` first iteration the per-task passes cross DDP's sink, and are
kept from queueing its delayed all-reduce (:func:`mtl._ddp.quiet_sinks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from ._combine import register_grad_hook, replace_grad, sum_backward
from ._ddp import find_sinks, quiet_sinks
from ._gram import combine_rows, device_gram, task_rows
from ._host import to_device
from ._info import BalanceInfo
from ._representation_level import row_buffers
from ._transfer import transfer_grams
from ._verdict import decide
from ._weights import balance_info, block_weights, head_coefficients, host_weights
from ._window import close_window

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = [
    "ParamBlock",
    "average_rows",
    "backward_parameters",
    "copy_all",
    "is_sparse",
    "parameter_rows",
    "parameter_update_mode",
]


class ParamBlock:
    """One gradient matrix of the parameter level.

    ``rows`` is ``(K, n)``: a dense block holds several parameters, parameter ``j`` in columns
    ``offsets[j]:offsets[j+1]``; a sparse block holds the rows ``ids`` of one parameter that some
    task touched. ``zeros[j]`` are the tasks that do not reach parameter ``j`` (zero rows).
    """

    def __init__(
        self,
        rows: Tensor,
        params: list[Tensor],
        offsets: list[int],
        ids: Tensor | None,
        zeros: list[set[int]],
    ) -> None:
        self.rows, self.params, self.offsets, self.ids, self.zeros = (
            rows,
            params,
            offsets,
            ids,
            zeros,
        )

    def piece(self, j: int | None) -> Tensor:
        """The columns of parameter ``j`` (a view), or the whole matrix for ``None``."""
        if j is None:
            return self.rows
        return self.rows[:, self.offsets[j] : self.offsets[j + 1]]

    def zero_rows(self, j: int | None) -> set[int]:
        """Tasks whose row of :meth:`piece` is zero by construction."""
        if j is not None:
            return self.zeros[j]
        return set.intersection(*self.zeros) if self.zeros else set()


def is_sparse(g: Tensor | None) -> bool:
    return g is not None and g.is_sparse


def copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i, as one fused launch where torch offers it."""
    if not dst:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and all(d.dtype == s.dtype for d, s in zip(dst, src)):
        foreach(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def parameter_update_mode(opt: BalancedOptimizer) -> str:
    if opt.parameter_update != "auto":
        return opt.parameter_update
    return "backward" if opt._group()[0] else "direct"


def parameter_rows(
    opt: BalancedOptimizer, losses: list[Tensor], params: list[Tensor]
) -> list[ParamBlock]:
    """The per-task gradients of the shared parameters, copied once into gradient matrices.

    Dense parameters of one dtype and device share ONE ``(K, sum of numel)`` matrix (kept
    from step to step like the representation rows); each sparse parameter gets its own
    matrix of the rows some task touched. Raises for a loss that reaches no parameter.
    """
    densify = opt._group()[0]  # ranks touch different rows: average dense gradients
    k_tasks = len(losses)
    grads: list[tuple[Tensor | None, ...]] = []
    for k, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        if all(g is None for g in gs):
            raise ValueError(
                f"the loss of {opt._name(k)} does not depend on any of the shared_parameters"
            )
        grads.append(gs)
    sparse_idx = [
        i for i in range(len(params)) if not densify and any(is_sparse(g[i]) for g in grads)
    ]
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i in range(len(params)):
        if i not in sparse_idx:
            groups.setdefault((params[i].dtype, params[i].device), []).append(i)
    shapes = [
        (sum(params[i].numel() for i in idx), dtype, device)
        for (dtype, device), idx in groups.items()
    ]
    blocks: list[ParamBlock] = []
    for buf, idx in zip(row_buffers(opt, k_tasks, shapes), groups.values()):
        offsets = [0]
        for i in idx:
            offsets.append(offsets[-1] + params[i].numel())
        for k in range(k_tasks):
            dst, src = [], []
            for j, i in enumerate(idx):
                g = grads[k][i]
                view = buf[k, offsets[j] : offsets[j + 1]]
                if g is None:
                    view.zero_()
                else:
                    dst.append(view)
                    src.append((g.to_dense() if g.is_sparse else g).reshape(-1))
            copy_all(dst, src)
        zeros = [{k for k in range(k_tasks) if grads[k][i] is None} for i in idx]
        blocks.append(ParamBlock(buf, [params[i] for i in idx], offsets, None, zeros))
    for i in sparse_idx:
        rows, ids = task_rows([g[i] for g in grads], params[i], densify=False)
        zeros = [{k for k in range(k_tasks) if grads[k][i] is None}]
        blocks.append(ParamBlock(rows, [params[i]], [0, rows.shape[1]], ids, zeros))
    return blocks


def average_rows(opt: BalancedOptimizer, rows: list[Tensor]) -> list[Tensor]:
    """Parameter level under DDP: the per-task gradients averaged over ranks.

    Unlike representation gradients (disjoint coordinates per rank, so the global Gram is
    sum_r M_r / W^2), parameter gradients of all ranks live in the same space and the global
    Gram has cross-rank terms; it needs the averaged K x D gradients (one all-reduce per
    gradient matrix).
    """
    active, group = opt._group()
    if not active:
        return rows
    world = dist.get_world_size(group)
    for r in rows:
        dist.all_reduce(r, group=group)
        r.div_(world)
    return rows


def backward_parameters(
    opt: BalancedOptimizer, losses: list[Tensor], values: Tensor, params: list[Tensor]
) -> BalanceInfo:
    with quiet_sinks(find_sinks(losses)):
        blocks = parameter_rows(opt, losses, params)
    average_rows(opt, [blk.rows for blk in blocks])
    # the Gram matrices' blocks: one per parameter tensor for per-block methods (MetaBalance
    # semantics), else one per gradient matrix (their sum is the Gram of all shared params)
    pieces: list[tuple[ParamBlock, int | None]]
    if opt.per_block:
        order = {id(p): i for i, p in enumerate(params)}  # blocks in the caller's order
        pieces = sorted(
            ((blk, j) for blk in blocks for j in range(len(blk.params))),
            key=lambda piece: order[id(piece[0].params[piece[1] or 0])],
        )
    else:
        pieces = [(blk, None) for blk in blocks]
    piece_rows = [blk.piece(j) for blk, j in pieces]
    zero = [blk.zero_rows(j) for blk, j in pieces]
    grams = torch.stack([device_gram(r) for r in piece_rows])
    host_values, host_grams = transfer_grams(opt, values, grams, piece_rows, zero, gram_power=0)
    verdict = decide(opt, "parameters", host_values, host_grams)
    if verdict is not None:
        return verdict
    weights, gram, extras = host_weights(opt, host_values, host_grams, len(pieces))
    bw = to_device(block_weights(weights, len(pieces)), piece_rows[0].device)
    combined: list[tuple[Tensor, Tensor]] = []  # (parameter, its combined gradient)
    for (blk, j), r, w in zip(pieces, piece_rows, bw):
        flat = w.to(r.dtype) @ r
        for jj in range(len(blk.params)) if j is None else [j]:
            p = blk.params[jj]
            part = flat if j is not None else flat[blk.offsets[jj] : blk.offsets[jj + 1]]
            combined.append((p, combine_rows(part, blk.ids, p)))
    coef = head_coefficients(weights, opt.weight_heads)
    if parameter_update_mode(opt) == "backward":
        # one ordinary backward; hooks replace each shared parameter's incoming gradient,
        # so DDP's own hooks average the combined gradient as usual
        handles = [register_grad_hook(p, replace_grad(g)) for p, g in combined]
        try:
            sum_backward(losses, coef)
        finally:
            for h in handles:
                h.remove()
    else:
        shared = {id(p) for p in params}
        heads = [
            p
            for g in opt.param_groups
            for p in g["params"]
            if p.requires_grad and id(p) not in shared
        ]
        if heads:  # heads only: the trunk is not traversed again
            sum_backward(losses, coef, inputs=heads)
        for p, g in combined:
            if p.grad is None:
                p.grad = g
            else:
                p.grad = p.grad + g if p.grad.is_sparse else p.grad.add_(g)
    close_window(opt)
    return balance_info(
        opt,
        "parameters",
        weights,
        host_values,
        gram,
        host_grams if opt.per_block else None,
        extras,
    )
