"""The K task losses of one batch: plain, from a loss-term regularizer, or from a perturbation
regularizer (LSPR/SCR)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._options import Regularizer

__all__ = ["LossContext", "LossFn", "forward_losses", "is_perturbation", "task_loss_fns"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _bce(pred: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred, target.to(pred.dtype))


def task_loss_fns(tasks: Sequence[Any]) -> list[LossFn]:
    """One loss function per task: BCE-with-logits (mean) for ``kind == "binary"``, MSE (mean)
    for ``kind == "regression"``. ``tasks`` are :class:`tasks.TaskSpec` (anything with ``.kind``
    and ``.name``)."""
    fns: list[LossFn] = []
    for t in tasks:
        if t.kind == "binary":
            fns.append(_bce)
        elif t.kind == "regression":
            fns.append(_mse)
        else:
            raise ValueError(f"task {t.name!r} has unknown kind {t.kind!r}")
    return fns


def is_perturbation(regularizer: Any) -> bool:
    """Whether ``regularizer`` is LSPR/SCR-style: ``reg(representation, heads, targets,
    loss_fns, ...)`` with ``closure``/``state_dict``/``load_state_dict``. Its class says so with
    the class attribute ``perturbs_representation = True``
    (:class:`balancers.regularizers.PerturbationRegularizer` sets it)."""
    return bool(getattr(type(regularizer), "perturbs_representation", False))


@dataclass(frozen=True)
class LossContext:
    """What turns a batch into the K losses; fixed for a whole run."""

    model: nn.Module
    loss_fns: list[LossFn]
    kinds: list[str]
    regularizer: Regularizer | None = None

    @property
    def perturbation(self) -> bool:
        return is_perturbation(self.regularizer)


@contextmanager
def _capture_output(model: nn.Module) -> Iterator[list[Any]]:
    """Record the outputs of ``model``'s forward calls while the context is open."""
    outputs: list[Any] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        outputs.append(output)

    handle = model.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _loss_term_losses(
    ctx: LossContext, features: Any, targets: Sequence[Tensor]
) -> tuple[list[Tensor], Any]:
    """``regularizer(model, features, targets, loss_fns)``: the losses, or (losses, output)."""
    assert ctx.regularizer is not None
    with _capture_output(ctx.model) as outputs:
        res = ctx.regularizer(ctx.model, features, targets, ctx.loss_fns)
    # (losses, model output): a model output is never a tensor, while K = 2 losses returned
    # as a tuple are two tensors
    if isinstance(res, tuple) and len(res) == 2 and not isinstance(res[1], Tensor):
        return list(res[0]), res[1]
    if not outputs:
        raise ValueError("the regularizer returned losses without ever calling the model")
    return list(res), outputs[0]


def forward_losses(
    ctx: LossContext, features: Any, targets: Sequence[Tensor]
) -> tuple[list[Tensor], Any]:
    """The K task losses and the model output whose representation they depend on."""
    if ctx.regularizer is not None and not ctx.perturbation:
        return _loss_term_losses(ctx, features, targets)
    out = ctx.model(features)
    if len(out.task_outputs) != len(ctx.loss_fns):
        raise ValueError(
            f"model returned {len(out.task_outputs)} task outputs but the data has "
            f"{len(ctx.loss_fns)} tasks"
        )
    if ctx.regularizer is None:
        return [fn(o, y) for fn, o, y in zip(ctx.loss_fns, out.task_outputs, targets)], out
    if getattr(out, "heads", None) is None:
        raise ValueError(
            "a perturbation regularizer needs ModelOutput.heads (the map from the representation "
            "to the task outputs); the models in mtl.models provide it"
        )
    losses = ctx.regularizer(
        out.representation,
        out.heads,
        targets,
        ctx.loss_fns,
        outputs=out.task_outputs,
        kinds=ctx.kinds,
    )
    return list(losses), out
