"""``CombinedOptimizer``: several torch optimizers behind one ``Optimizer`` interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer

from ._optimizer import init_optimizer_hooks

__all__ = ["CombinedOptimizer"]


class CombinedOptimizer(Optimizer):
    """Several optimizers stepped as one, so that one balancer can wrap them all.

    The usual case: ``torch.optim.SparseAdam`` for ``nn.Embedding(sparse=True)`` tables and Adam
    for the dense rest::

        inner = CombinedOptimizer([SparseAdam(tables, lr=1e-3), Adam(dense, lr=1e-3)])
        opt = MGDA(inner, num_tasks=2)

    ``param_groups`` is the concatenation of the optimizers' groups (the same dicts, so LR
    schedulers and ``GradScaler`` reach them); ``state`` is a merged read-only view;
    ``state_dict()`` holds one state dict per optimizer, so checkpoints round-trip.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self.optimizers = list(optimizers)
        if not self.optimizers or not all(isinstance(o, Optimizer) for o in self.optimizers):
            raise TypeError("CombinedOptimizer needs a non-empty sequence of torch optimizers")
        init_optimizer_hooks(self)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if len(state_dict["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"state_dict holds {len(state_dict['optimizers'])} optimizers, "
                f"this CombinedOptimizer has {len(self.optimizers)}"
            )
        for o, sd in zip(self.optimizers, state_dict["optimizers"]):
            o.load_state_dict(sd)

    def __repr__(self) -> str:
        return "CombinedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"
