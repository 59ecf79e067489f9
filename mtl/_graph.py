"""Autograd-graph utilities: dependency checks and Gram matrices of task gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["depends_on", "gram_matrix", "replace_grad", "weighted_sum"]


def _node_of(t: Tensor) -> object | None:
    """The autograd node that receives ``t``'s gradient (grad_fn, or AccumulateGrad for leaves)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        # A leaf: its AccumulateGrad node is reachable through an expand view.
        return t.view_as(t).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
    return None


def depends_on(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[bool]:
    """For each output, whether its autograd graph reaches any of ``inputs``.

    A walk over the graph (no gradient is computed): a loss like ``0 * z`` depends on ``z``,
    a loss computed from ``z.detach()`` does not. Shared sub-graphs are visited once.
    """
    targets = {id(n) for n in (_node_of(t) for t in inputs) if n is not None}
    memo: dict[int, bool] = {}

    def reaches(root: object | None) -> bool:
        if root is None:
            return False
        stack: list[tuple[object, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            key = id(node)
            if key in memo and not expanded:
                continue
            if key in targets:
                memo[key] = True
                continue
            children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
            if expanded:
                memo[key] = any(memo.get(id(c), False) for c in children)
                continue
            memo[key] = False  # provisional; graphs are acyclic
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in memo)
        return memo[id(root)]

    return [reaches(o.grad_fn) for o in outputs]


def _chunked_gram(rows: Tensor, chunk: int, scale: Tensor | None) -> Tensor:
    k, n = rows.shape
    out = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for start in range(0, n, chunk):
        part = rows[:, start : start + chunk]
        if part.dtype != torch.float32:
            part = part.float()
        if scale is not None:
            part = part * scale[:, None]
        out += (part @ part.T).to(torch.float64)
    return out


def gram_matrix(rows: Tensor, *, chunk: int = 1 << 15) -> Tensor:
    """Float64 Gram matrix ``rows @ rows.T`` of a ``(K, N)`` matrix of flattened gradients.

    Float64 rows: one float64 product. Lower precision rows (float32; bfloat16/float16 are
    widened one chunk at a time): float32 products over column chunks of ``chunk`` entries,
    accumulated in float64. That avoids a float64 copy of the K x N gradients (the dominant cost
    at large K) and keeps the rounding of each partial product to about ``sqrt(chunk) * 6e-8``
    relative; the sum over chunks adds no float32 rounding. If a diagonal entry comes out
    infinite or below 1e-30 (float32 overflow or underflow: ``GradScaler`` losses scaled by
    2^24, tasks whose gradients are 1e-20), the product is redone with each row scaled by a
    power of two that brings its largest entry into [1, 2) (exact), the scaling being undone in
    float64; genuinely non-finite gradients still give a non-finite Gram.
    """
    k, n = rows.shape
    if rows.dtype == torch.float64:
        return rows @ rows.T
    if n == 0:
        return torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    out = _chunked_gram(rows, chunk, None)
    diag = out.diagonal()
    suspect = ~(diag > 1e-30) | ~torch.isfinite(diag)
    for i in torch.nonzero(suspect & (diag == 0)).flatten().tolist():
        suspect[i] = bool(rows[i].any())  # an exactly zero gradient is fine, underflow is not
    if not bool(suspect.any()) and bool(torch.isfinite(out).all()):
        return out
    # largest magnitude per row from two plain reductions (no |rows| temporary)
    peak = torch.maximum(rows.amax(dim=1), -rows.amin(dim=1)).to(torch.float32)
    exponent = torch.where(peak > 0, torch.floor(torch.log2(peak)), torch.zeros_like(peak))
    exponent = torch.where(torch.isfinite(exponent), exponent, torch.zeros_like(exponent))
    out = _chunked_gram(rows, chunk, torch.exp2(-exponent))
    unscale = torch.exp2(exponent.to(torch.float64))
    return out * unscale[:, None] * unscale[None, :]


def weighted_sum(losses: Sequence[Tensor], coefficients: Sequence[float] | Tensor | None) -> Tensor:
    """``sum_k c_k L_k`` with Python-float coefficients (``None``: the plain sum)."""
    if coefficients is None:
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total
    cs = coefficients.tolist() if isinstance(coefficients, Tensor) else list(coefficients)
    total = cs[0] * losses[0]
    for c, loss in zip(cs[1:], losses[1:]):
        total = total + c * loss
    return total


def replace_grad(grad: Tensor) -> Callable[[Tensor], Tensor]:
    """A tensor hook that replaces the incoming gradient by ``grad``."""

    def hook(_incoming: Tensor) -> Tensor:
        return grad

    return hook
