"""The task losses the perturbation regularizers evaluate on the clean and perturbed outputs.

A task's loss is given as a kind (``"binary"``: BCE with logits; ``"regression"``: MSE; see
:func:`task_loss`) or as a callable ``loss_fn(output, target) -> scalar tensor``; the kind of
the well-known callables is inferred (SCR's ``divergence="auto"`` needs it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
LossSpec = str | LossFn

KINDS: tuple[str, ...] = ("binary", "regression")


def task_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """Built-in task losses (mean over the batch): ``"binary"`` =
    ``binary_cross_entropy_with_logits``, ``"regression"`` = ``mse_loss``.

    The target is cast to the output's dtype and reshaped to its shape when the number of
    elements agrees (``(B, 1)`` vs ``(B,)``).
    """
    target = _match_target(output, target)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(output, target)
    if kind == "regression":
        return F.mse_loss(output, target)
    raise ValueError(f"unknown task kind {kind!r}; expected one of {list(KINDS)}")


def _match_target(output: Tensor, target: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        target = torch.as_tensor(target, device=output.device)
    if target.shape != output.shape:
        if target.numel() != output.numel():
            raise ValueError(
                f"target of shape {tuple(target.shape)} does not match the output of shape "
                f"{tuple(output.shape)}"
            )
        target = target.reshape(output.shape)
    return target.to(output.dtype)


def _infer_kind(fn: object) -> str | None:
    """The kind of a well-known loss callable, else ``None``."""
    if fn is F.binary_cross_entropy_with_logits or isinstance(fn, nn.BCEWithLogitsLoss):
        return "binary"
    if fn is F.mse_loss or isinstance(fn, nn.MSELoss):
        return "regression"
    return None


def _builtin(kind: str) -> LossFn:
    def fn(output: Tensor, target: Tensor) -> Tensor:
        return task_loss(kind, output, target)

    return fn
