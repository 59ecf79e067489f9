"""The last stage of a balanced step: the combined gradient reaches the parameters.

Representation level: ONE backward in which the balance point's incoming gradient is replaced by
``sum_k c_k h_k`` (:func:`replace_grad`), or, when the heads are disjoint from the trunk, a
trunk-only backward from the balance point plus the heads' gradients kept from the per-task
passes (:func:`accumulate_head_grads`). Parameter level: ``sum_k c_k g_k`` written into the shared
``.grad`` or routed through one backward with parameter hooks (DDP). Coefficients arrive as host
floats, so nothing here waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = [
    "accumulate_head_grads",
    "register_grad_hook",
    "replace_grad",
    "sum_backward",
    "weighted_sum",
]


def weighted_sum(losses: Sequence[Tensor], coefficients: Sequence[float] | Tensor | None) -> Tensor:
    """``sum_k c_k L_k`` with Python-float coefficients (``None``: the plain sum).

    A tensor of coefficients is read back to the host first (a synchronization on a GPU): pass
    floats where it matters.
    """
    if coefficients is None:
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total
    cs = (
        coefficients.tolist()
        if isinstance(coefficients, Tensor)
        else [float(c) for c in coefficients]
    )
    total = cs[0] * losses[0]
    for c, loss in zip(cs[1:], losses[1:]):
        total = total + c * loss
    return total


def sum_backward(
    losses: Sequence[Tensor],
    coefficients: Sequence[float] | None,
    inputs: Sequence[Tensor] | None = None,
) -> None:
    """One backward of ``sum_k c_k L_k`` (of the plain sum when every ``c_k`` is one)."""
    plain = coefficients is None or all(c == 1.0 for c in coefficients)
    total = weighted_sum(losses, None if plain else coefficients)
    if inputs is None:
        torch.autograd.backward(total)
    else:
        torch.autograd.backward(total, inputs=list(inputs))


def accumulate_head_grads(
    heads: Sequence[Sequence[Tensor]],
    head_grads: Sequence[Sequence[Tensor | None]],
    coefficients: Sequence[float] | None,
) -> None:
    """``p.grad += sum_k c_k dL_k/dp`` over the tasks k that reach head parameter ``p``
    (``c_k = 1`` without coefficients); a parameter one task reaches takes that gradient as is.
    """
    totals: dict[int, tuple[Tensor, Tensor]] = {}
    for k, (params, grads) in enumerate(zip(heads, head_grads)):
        for p, g in zip(params, grads):
            if g is None:
                continue
            if coefficients is not None:
                g = g * coefficients[k]
            prev = totals.get(id(p))
            totals[id(p)] = (p, g if prev is None else prev[1] + g)
    for p, g in totals.values():
        p.grad = g if p.grad is None else p.grad + g


def register_grad_hook(t: Tensor, hook: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """``t.register_hook(hook)``, typed (torch's stub leaves the method untyped)."""
    register: Callable[[Callable[[Tensor], Tensor | None]], RemovableHandle] = t.register_hook
    return register(hook)


def replace_grad(grad: Tensor) -> Callable[[Tensor], Tensor]:
    """A tensor hook that replaces the incoming gradient by ``grad``."""

    def hook(_incoming: Tensor) -> Tensor:
        return grad

    return hook
