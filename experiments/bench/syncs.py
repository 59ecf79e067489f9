"""Count the host synchronizations a piece of PyTorch code asks for (``python -m experiments bench``).

A *host sync* is a call that needs a tensor's value on the host: on a GPU it waits for every
kernel queued before it (``t.item()``, ``if t:``, ``t.tolist()``, ``t.cpu()``...), on a CPU it
marks the same places. :class:`SyncCounter` is a :class:`torch.overrides.TorchFunctionMode` that
counts, while it is active, the calls whose function name (``getattr(func, "__name__", "")``) is
one of :data:`SYNC_NAMES`::

    with SyncCounter() as counter:
        opt.backward(losses, representation=z)
    counter.total, dict(counter.counts)

Only top-level calls are seen: inside a call the mode handles, torch disables the mode, so the
calls a handled function makes itself are not dispatched to it again (``torch.nonzero`` calling
``.item()`` internally counts once, as ``nonzero``). Code that never goes through Python's torch
API (the autograd engine's C++ backward kernels) is not seen either; that is the point: what is
counted is the Python-level control flow that needs a value on the host.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch.overrides import TorchFunctionMode

__all__ = ["SYNC_NAMES", "SyncCounter", "count_syncs"]

#: names of the functions and methods counted as host synchronizations
SYNC_NAMES: frozenset[str] = frozenset(
    {"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero"}
)


class SyncCounter(TorchFunctionMode):
    """Count calls of :data:`SYNC_NAMES` (or ``names``) made while the mode is active.

    Attributes:
        counts: ``Counter`` of the counted function names.
        calls: the counted names in call order.
        total: the number of counted calls (property; ``count`` is the same).
    """

    def __init__(self, names: Iterable[str] = SYNC_NAMES) -> None:
        super().__init__()
        self.names = frozenset(names)
        self.counts: Counter[str] = Counter()
        self.calls: list[str] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.names:
            self.counts[name] += 1
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def count(self) -> int:
        return self.total

    def reset(self) -> None:
        self.counts.clear()
        self.calls.clear()


def count_syncs(fn: Callable[[], Any], names: Iterable[str] = SYNC_NAMES) -> SyncCounter:
    """Run ``fn()`` under a fresh :class:`SyncCounter` and return the counter."""
    counter = SyncCounter(names)
    with counter:
        fn()
    return counter
