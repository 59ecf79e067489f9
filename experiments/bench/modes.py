"""Modes: the ways of doing one training step that a group times side by side.

A *mode* is a zero-argument callable that performs ONE full training step (forward, losses,
backward, optimizer step) and returns whatever the backward returned (``BalanceInfo`` for our
balancers). :class:`ModeSpec` describes one; :func:`make_mode` builds its callable on a group:
the plain summed-loss step, one of our balancers at one level (optionally with a
``ConflictTracker``), or a peer library's step (:mod:`experiments.bench.peers`).

The plain and balanced steps carry a ``backward_context`` slot (a one-item list): a context
manager put there is entered around the backward call only; :func:`count_backward_syncs` puts a
:class:`~experiments.bench.syncs.SyncCounter` there for one untimed step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from balancers.registry import balancer_class, make_balancer
from experiments.bench.model import Group, task_losses
from experiments.bench.peers import rechub_step, torchjd_step
from experiments.bench.syncs import SyncCounter
from mtl import BalancedOptimizer, BalanceInfo, ConflictTracker
from mtl.models import SharedBottom

__all__ = ["ModeSpec", "count_backward_syncs", "make_mode", "uses_task_gradients"]

#: the ``backward_context`` slot of a step: ``[None]``, or ``[a context manager]``
ContextSlot = list[AbstractContextManager[Any] | None]


@dataclass(frozen=True)
class ModeSpec:
    """One way of doing a training step.

    Attributes:
        name: unique label, e.g. ``"plain"``, ``"rep:mgda"``, ``"param:gradops"``,
            ``"torchjd:upgrad:emb"``, ``"rechub:metabalance"``, ``"rep:mgda+tracker"``.
        kind: ``"plain"``, ``"ours"``, ``"tracker"`` (ours + ConflictTracker), ``"torchjd"``,
            ``"rechub"``.
        method: balancer registry name (ours) or aggregator name (torchjd).
        level: ``"representation"``, ``"parameters"`` or ``"-"`` (plain).
        options: keyword options of the balancer / peer.
        include_embeddings: torchjd only: whether the embedding tables are in the shared set.
    """

    name: str
    kind: str
    method: str = "-"
    level: str = "-"
    options: tuple[tuple[str, Any], ...] = ()
    include_embeddings: bool = True
    steps: int | None = None  # block length override (the tracker uses ``every`` steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModeSpec:
        d = dict(d)
        d["options"] = tuple(sorted(dict(d.get("options") or {}).items()))
        return cls(**d)


class PlainStep:
    """The baseline: ``sum(losses).backward(); inner.step()``."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.backward_context: ContextSlot = [None]

    def __call__(self) -> None:
        group = self.group
        x, ys = group.next_batch()
        losses = task_losses(group.model(x).task_outputs, ys)
        group.inner.zero_grad()
        ctx = self.backward_context[0]
        if ctx is None:
            sum(losses).backward()  # type: ignore[union-attr]
        else:
            with ctx:
                sum(losses).backward()  # type: ignore[union-attr]
        group.inner.step()


class BalancedStep:
    """One of our balancers at one level, optionally feeding a ``ConflictTracker(every=10)``.

    Balancers whose ``backward`` takes a ``closure`` (class flag ``needs_closure``) get the one
    their class asks for: with ``closure_reruns_model`` (FAMO) a zero-argument closure that
    re-runs the whole model on the step's batch, at both levels; otherwise (MARIGOLD) the heads
    on a shifted representation at the representation level, the whole model at the parameter
    level. Loss-level balancers (``uses_gradients=False``) need nothing else: their step is one
    weighted backward.
    """

    def __init__(self, spec: ModeSpec, group: Group) -> None:
        self.group = group
        self.balancer: BalancedOptimizer = make_balancer(
            spec.method, group.inner, group.num_tasks, **dict(spec.options)
        )
        self.level = spec.level
        cls = type(self.balancer)
        self.needs_closure = bool(cls.needs_closure)
        self.closure_reruns_model = bool(cls.closure_reruns_model)
        self.tracker = ConflictTracker(every=10) if spec.kind == "tracker" else None
        self.backward_context: ContextSlot = [None]
        self.counter = 0

    def _closure(self, out: Any, x: Any, ys: list[Tensor]) -> Callable[..., list[Tensor]]:
        model = self.group.model
        if self.level == "representation" and not self.closure_reruns_model:
            heads = out.heads
            return lambda z: task_losses(heads(z), ys)
        return lambda: task_losses(model(x).task_outputs, ys)

    def _backward_kwargs(self, out: Any, x: Any, ys: list[Tensor]) -> dict[str, Any]:
        kwargs: dict[str, Any]
        if self.level == "representation":
            kwargs = {"representation": out.representation}
        else:
            kwargs = {"shared_parameters": self.group.shared}
        if self.needs_closure:
            kwargs["closure"] = self._closure(out, x, ys)
        return kwargs

    def __call__(self) -> BalanceInfo:
        x, ys = self.group.next_batch()
        out = self.group.model(x)
        losses = task_losses(out.task_outputs, ys)
        opt = self.balancer
        opt.zero_grad()
        kwargs = self._backward_kwargs(out, x, ys)
        ctx = self.backward_context[0]
        if ctx is None:
            info = opt.backward(losses, **kwargs)
        else:
            with ctx:
                info = opt.backward(losses, **kwargs)
        opt.step()
        if self.tracker is not None:
            self.tracker.update(self.counter, info)
        self.counter += 1
        return info


def uses_task_gradients(method: str) -> bool:
    """Whether balancer ``method`` may compute per-task gradients (what the memory guard of a
    parameter-level mode estimates): ``True`` when its class needs the Gram matrix or uses
    gradients without a loss closure (EqualWeight counts, conservatively, as before);
    ``False`` for MARIGOLD (losses only, one extra forward) and the loss-level methods
    (``uses_gradients=False``: UW, DWA, RLW, GLS, FAMO; one weighted backward)."""
    cls = balancer_class(method)
    return bool(cls.requires_gram or (cls.uses_gradients and not cls.needs_closure))


def _bottom_parameters(model: SharedBottom) -> list[nn.Parameter]:
    return list(model.bottom.parameters())


def make_mode(spec: ModeSpec, group: Group) -> Callable[[], Any]:
    """The step callable of ``spec`` on ``group`` (raises ImportError for a missing peer)."""
    if spec.kind == "plain":
        return PlainStep(group)
    if spec.kind in ("ours", "tracker"):
        return BalancedStep(spec, group)
    if spec.kind == "torchjd":
        params = group.shared if spec.include_embeddings else _bottom_parameters(group.model)
        return torchjd_step(group, spec.method, params, dict(spec.options))
    if spec.kind == "rechub":
        return rechub_step(group, dict(spec.options))
    raise ValueError(f"unknown mode kind {spec.kind!r}")


def count_backward_syncs(fn: Callable[[], Any]) -> dict[str, Any] | None:
    """Host syncs inside the backward call of ONE step of mode ``fn`` (not timed).

    ``fn`` must come from :func:`make_mode` (its ``backward_context`` slot); returns
    ``{"total": n, "by_name": {...}}``, or None for a mode without the slot (peers). The step is
    a real training step (the model moves), so call it outside the timed blocks.
    """
    slot = getattr(fn, "backward_context", None)
    if slot is None:
        return None
    counter = SyncCounter()
    slot[0] = counter
    try:
        fn()
    finally:
        slot[0] = None
    return {"total": counter.total, "by_name": dict(sorted(counter.counts.items()))}
