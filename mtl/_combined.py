"""``CombinedOptimizer``: several torch optimizers behind one ``Optimizer`` interface."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, overload

import torch
from torch import Tensor
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
    ``defaults`` is empty; the three cannot be assigned (set them on the optimizers).
    ``state_dict()`` holds one state dict per optimizer, so checkpoints round-trip.
    :meth:`add_param_group` adds a group to one of the optimizers (the only one, or the one
    named by ``optimizer=``).
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self.optimizers = list(optimizers)
        if not self.optimizers or not all(isinstance(o, Optimizer) for o in self.optimizers):
            raise TypeError("CombinedOptimizer needs a non-empty sequence of torch optimizers")
        init_optimizer_hooks(self)

    # Optimizer declares these three as plain attributes; here they are views of the
    # optimizers, so the setters refuse assignment (as a property without setter would).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> NoReturn:
        _read_only("param_groups")

    @property
    def state(self) -> defaultdict[Tensor, Any]:
        merged: defaultdict[Tensor, Any] = defaultdict(dict)
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> NoReturn:
        _read_only("state")

    @property
    def defaults(self) -> dict[str, Any]:
        return {}

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> NoReturn:
        _read_only("defaults")

    def add_param_group(
        self, param_group: dict[str, Any], optimizer: int | Optimizer | None = None
    ) -> None:
        """Add ``param_group`` to one of the optimizers, which fills in its defaults (``lr``,
        ``betas``...); the group then shows in :attr:`param_groups` and is stepped.

        Args:
            param_group: as for :meth:`torch.optim.Optimizer.add_param_group`.
            optimizer: which optimizer takes it: an index into :attr:`optimizers` or one of
                them. May be omitted only when there is one optimizer: with several the
                choice decides the update rule and the hyper-parameters of the new
                parameters (``SparseAdam`` for sparse tables, ``Adam`` for the rest...), so
                it is not guessed.

        Raises:
            ValueError: ``optimizer`` omitted with several optimizers, or it is not one of
                them; a parameter that an optimizer already manages (torch raises it for
                the chosen optimizer; here for every other one as well).
        """
        target = self._target(optimizer)
        target.add_param_group(param_group)  # normalizes and checks params, fills defaults
        others = {id(p) for o in self.optimizers if o is not target for p in _params(o)}
        if any(id(p) in others for p in param_group["params"]):
            target.param_groups.pop()  # just appended by torch; no state exists for it yet
            raise ValueError(
                "some parameters appear in more than one parameter group (another optimizer "
                "of this CombinedOptimizer already manages them)"
            )

    def _target(self, optimizer: int | Optimizer | None) -> Optimizer:
        names = ", ".join(f"{i}: {type(o).__name__}" for i, o in enumerate(self.optimizers))
        if optimizer is None:
            if len(self.optimizers) == 1:
                return self.optimizers[0]
            raise ValueError(
                f"CombinedOptimizer.add_param_group: this CombinedOptimizer holds "
                f"{len(self.optimizers)} optimizers ({names}); say which one takes the new "
                "group with optimizer=INDEX (or call add_param_group on that optimizer)"
            )
        if isinstance(optimizer, Optimizer):
            for o in self.optimizers:
                if o is optimizer:
                    return o
        elif isinstance(optimizer, int) and not isinstance(optimizer, bool):
            if 0 <= optimizer < len(self.optimizers):
                return self.optimizers[optimizer]
        raise ValueError(
            f"CombinedOptimizer.add_param_group: optimizer={optimizer!r} is not one of its "
            f"optimizers ({names}); give an index or one of them"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step every optimizer; a ``closure`` is evaluated once first (with grad enabled) and
        its loss returned, as ``torch.optim`` optimizers do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"state_dict holds {len(state_dict['optimizers'])} optimizers, "
                f"this CombinedOptimizer has {len(self.optimizers)}"
            )
        for o, sd in zip(self.optimizers, state_dict["optimizers"]):
            o.load_state_dict(sd)

    def __repr__(self) -> str:
        return "CombinedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


def _params(optimizer: Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _read_only(name: str) -> NoReturn:
    raise AttributeError(
        f"CombinedOptimizer.{name} is a read-only view of its optimizers; set it on them"
    )
