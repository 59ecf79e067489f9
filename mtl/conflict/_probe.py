"""The tracker's parameter-level probe: the float64 Gram matrix of the task gradients at the
shared *parameters* (K ``autograd.grad`` calls, as expensive as parameter-level balancing), and
the check of the parameters it differentiates. :meth:`ConflictTracker.update_parameter_level`
records it next to the representation-level Gram matrix of the balancer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .._gram import gram_matrix, task_rows

__all__ = ["parameter_gram", "probe_parameters"]


def probe_parameters(shared_parameters: Iterable[Tensor]) -> list[Tensor]:
    """The tensors of ``shared_parameters`` that require grad (there must be one)."""
    if isinstance(shared_parameters, Tensor):
        raise TypeError("shared_parameters must be an iterable of tensors (wrap it in a list)")
    params = [p for p in shared_parameters if p.requires_grad]
    if not params:
        raise ValueError("shared_parameters has no tensor that requires grad")
    return params


def parameter_gram(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The float64 Gram matrix (on the CPU) of the task gradients ``dL_k / d params``.

    K ``torch.autograd.grad(L_k, params, retain_graph=True)`` calls (``.grad`` untouched), then
    :func:`mtl._gram.gram_matrix` of each parameter's ``(K, n)`` rows (:func:`mtl._gram.task_rows`:
    sparse gradients keep only the touched rows), summed over the parameters.
    """
    grads = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    m = torch.zeros(len(losses), len(losses), dtype=torch.float64)
    for j, p in enumerate(params):
        column: list[Tensor | None] = [g[j] for g in grads]
        rows, _ = task_rows(column, p, densify=False)
        m += gram_matrix(rows).cpu()
    return m
