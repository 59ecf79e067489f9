"""The ``closure=`` argument of balancers that re-evaluate the losses (class flag
``needs_closure``: MARIGOLD), and the random state it replays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._losses import LossContext, LossFn, forward_losses
from ._options import Level, Regularizer

__all__ = ["RngState", "get_rng", "make_closure", "rng_devices", "set_rng"]

#: the CPU generator state and one state per CUDA device in use.
RngState = tuple[Tensor, list[Tensor]]


def rng_devices(dev: torch.device) -> list[int]:
    """CUDA device indices whose RNG matters (dropout on the GPU)."""
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def get_rng(devices: list[int]) -> RngState:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_rng(state: RngState, devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, st in zip(devices, cuda):
        torch.cuda.set_rng_state(st, d)


def make_closure(
    level: Level,
    ctx: LossContext,
    out: Any,
    features: Any,
    targets: Sequence[Tensor],
    rng_state: RngState,
    devices: list[int],
) -> Callable[..., list[Tensor]]:
    """The ``closure=`` argument of balancers that take one (MARIGOLD).

    * parameter level: re-runs the model on the same batch with the same dropout masks (the
      random state of the original forward is replayed) and returns the K losses;
    * representation level: maps a (shifted) representation to the K losses through
      ``out.heads`` (everything that does not depend on the representation, e.g. MMoE's gates,
      is reused as computed); with LSPR/SCR the same noise is replayed.
    """
    if level == "parameters":

        def closure() -> list[Tensor]:
            with torch.random.fork_rng(devices=devices):
                set_rng(rng_state, devices)
                return forward_losses(ctx, features, targets)[0]

        return closure
    heads = getattr(out, "heads", None)
    if heads is None:
        raise ValueError(
            "this balancer evaluates the losses at a shifted representation, which needs "
            "ModelOutput.heads; use level='parameters' or a model from mtl.models"
        )
    if ctx.perturbation:
        reg: Any = ctx.regularizer
        replay: Callable[..., list[Tensor]] = reg.closure(
            heads, targets, ctx.loss_fns, kinds=ctx.kinds
        )
        return replay
    loss_fns = ctx.loss_fns

    def rep_closure(representation: Tensor) -> list[Tensor]:
        return [fn(o, y) for fn, o, y in zip(loss_fns, heads(representation), targets)]

    return rep_closure


def _make_closure(
    level: Level,
    model: nn.Module,
    out: Any,
    features: Any,
    targets: Sequence[Tensor],
    loss_fns: Sequence[LossFn],
    kinds: Sequence[str],
    regularizer: Regularizer | None,
    rng_state: RngState,
    devices: list[int],
) -> Callable[..., list[Tensor]]:
    """The pre-package spelling of :func:`make_closure` (kept for existing callers)."""
    ctx = LossContext(model, list(loss_fns), list(kinds), regularizer)
    return make_closure(level, ctx, out, features, targets, rng_state, devices)
