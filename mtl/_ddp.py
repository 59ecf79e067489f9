"""``DistributedDataParallel`` and the balanced step: its modes, and the check that DDP synced.

A balanced backward is K per-task passes plus ONE ordinary backward; DDP must see only that last
one. Per mode (``docs/ddp.md`` has the table and the tests):

* ``find_unused_parameters=True`` (every iteration) and ``static_graph=True`` (its first
  iteration) pass the forward's outputs through DDP's ``_DDPSink`` autograd node. The heads
  consumed the tensor *before* that node, so no task loss reaches the representation DDP
  returns: :func:`resolve_blocks` takes the gradients at the sink's input instead (the sink is
  the identity), as a :class:`~torch.autograd.graph.GradientEdge`.
* ``static_graph=True``, first iteration: the sink's backward queues DDP's one delayed
  all-reduce of every gradient at the end of the first backward pass that crosses it, which
  would be the first per-task pass, before any gradient exists. :func:`quiet_sinks` keeps the
  per-task passes from queueing it, so the step's ordinary backward does.
* Gradients that DDP never all-reduced (every backward of the window under ``no_sync()``, a
  forward that bypassed the DDP wrapper so its hooks were not armed, ``static_graph=True`` with
  an output DDP cannot see into): :func:`grad_probe` samples every gradient; ``step()``
  compares the samples over the ranks with the collective it makes anyway and raises
  :func:`unsynced_error` instead of stepping (:func:`mtl._window.step_flags`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = [
    "Target",
    "find_sinks",
    "grad_probe",
    "is_sink",
    "quiet_sinks",
    "resolve_blocks",
    "sink_input",
    "sink_output_error",
    "unsynced_error",
]

#: where a balanced step takes the gradient of a representation block: the tensor itself, or
#: the edge into the node that computed it (the input of DDP's sink, for an output of DDP)
Target: TypeAlias = "Tensor | GradientEdge"


def is_sink(node: object) -> bool:
    """Whether an autograd node is the backward of DDP's ``_DDPSink`` (named, not imported:
    the class is private to torch)."""
    cls = getattr(node, "_forward_cls", None)
    return cls is not None and getattr(cls, "__name__", "") == "_DDPSink"


def _module(sink: object) -> Any:
    ref = getattr(sink, "ddp_weakref", None)
    return ref() if callable(ref) else None


@contextmanager
def quiet_sinks(sinks: Iterable[object]) -> Iterator[None]:
    """Per-task passes through DDP's sink on a ``static_graph=True`` first iteration: mark
    the delayed all-reduce as queued so that they do not queue it; the step's ordinary
    backward, after this block, does.

    Raises:
        RuntimeError: that first iteration's forward ran under ``no_sync()``. DDP records the
            graph on it and cannot without its gradient hooks (it fails with an internal
            assertion at the end of the backward).
    """
    pending: list[Any] = []
    for sink in sinks:
        ddp = _module(sink)
        if (
            ddp is None
            or not getattr(ddp, "static_graph", False)
            or getattr(ddp, "_static_graph_delay_allreduce_enqueued", True) is not False
            or any(ddp is other for other in pending)
        ):
            continue
        if not getattr(ddp, "require_forward_param_sync", True):
            raise RuntimeError(
                "DistributedDataParallel(static_graph=True) records the graph on its first "
                "iteration, whose forward ran under no_sync(): DDP cannot record it without "
                "its gradient hooks. Run the first iteration outside no_sync(), or construct "
                "DDP with static_graph=False"
            )
        pending.append(ddp)
    for ddp in pending:
        ddp._static_graph_delay_allreduce_enqueued = True
    try:
        yield
    finally:
        for ddp in pending:
            ddp._static_graph_delay_allreduce_enqueued = False


def find_sinks(losses: Sequence[Tensor]) -> list[object]:
    """DDP sink nodes anywhere in the losses' graph (a walk of the whole graph; only under an
    initialized process group, as DDP needs one)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return []
    sinks: list[object] = []
    seen: set[object] = set()  # holds every visited node alive (see mtl._graph)
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_sink(node):
            sinks.append(node)
        stack.extend(c for c, _ in getattr(node, "next_functions", ()) if c is not None)
    return sinks


def resolve_blocks(blocks: Sequence[Tensor]) -> list[Target]:
    """Each block, or, for a block that DDP's sink returned, the edge into the node that
    computed the sink's input (the tensor the heads consumed)."""
    out: list[Target] = []
    for z in blocks:
        if not is_sink(z.grad_fn):
            out.append(z)
            continue
        edge = sink_input(z.grad_fn, z.output_nr)
        if edge is None:
            raise ValueError(
                "the representation is an output of DistributedDataParallel whose input does "
                "not require grad: pass the output of the shared trunk"
            )
        out.append(GradientEdge(*edge))
    return out


def sink_input(sink: object, output_nr: int) -> tuple[Any, int] | None:
    """The edge into the input of DDP's sink that its output ``output_nr`` passes on (the
    sink is the identity), or ``None`` when that input does not require grad.

    The sink's forward takes ``(ddp_weakref, *outputs)`` and returns ``outputs``: output j is
    input j + 1, where non-tensor values take a position but no edge, and tensors that do not
    require grad take an edge to nothing. ``needs_input_grad`` (one flag per input) tells the
    inputs that require grad apart; they hold the non-empty edges, in order.
    """
    needs = tuple(getattr(sink, "needs_input_grad", ()))
    if output_nr + 1 >= len(needs) or not needs[output_nr + 1]:
        return None
    rank = sum(bool(n) for n in needs[1 : output_nr + 1])  # inputs before it with an edge
    live = [(node, nr) for node, nr in getattr(sink, "next_functions", ()) if node is not None]
    return live[rank] if rank < len(live) else None


def sink_output_error(who: str) -> ValueError:
    """A representation that DDP's sink returned, given to code that cannot look through it."""
    return ValueError(
        "the representation is an output of DistributedDataParallel that passed through DDP's "
        "_DDPSink node (find_unused_parameters=True, or static_graph=True on its first "
        f"iteration), and the heads consumed the tensor before that node: {who} cannot "
        "balance at it. Construct DDP with find_unused_parameters=False and static_graph="
        "False, or balance at shared_parameters="
    )


def grad_probe(params: Sequence[Tensor]) -> Tensor | None:
    """``(1,)`` float64: a sum of a few entries of every dense, replicated gradient (bit for
    bit the same on every rank when DDP averaged them; different with overwhelming probability
    when it did not). ``None`` without parameters. No host synchronization: one
    concatenation and one sum per (device, dtype).

    Skipped: sparse gradients, tensor subclasses (DTensor) and parameters DDP ignores or
    FSDP shards, whose gradients differ across ranks by design.
    """
    if not params:
        return None
    device = params[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        g = p.grad
        if (
            g is None
            or g.is_sparse
            or type(g) is not Tensor
            or getattr(p, "_ddp_ignored", False)
            or getattr(p, "_fsdp_flattened", False)
        ):
            continue
        n = g.numel()
        if n:
            flat = g.reshape(-1)
            groups.setdefault((g.device, g.dtype), []).append(flat[:: max(1, n // 4)][:4])
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for parts in groups.values():
        total = total + torch.cat(parts).to(torch.float64).sum().to(device)
    return total


def unsynced_error() -> RuntimeError:
    return RuntimeError(
        "step(): the gradients differ across ranks: DistributedDataParallel did not "
        "all-reduce them in this accumulation window, and stepping would let the ranks drift "
        "apart; the step was not taken. DDP skips the all-reduce when (1) every backward of "
        "the window ran under ddp.no_sync(): run the window's last forward and backward "
        "outside no_sync(); (2) the forward bypassed the DDP wrapper (model.module(x), or a "
        "framework that calls the wrapped module, so DDP's gradient hooks were not "
        "prepared): call the DDP module itself; (3) static_graph=True with a model output "
        "DDP cannot look into, such as a dataclass (DDP never all-reduces then): return a "
        "tuple, list, dict or namedtuple, or construct DDP with static_graph=False; (4) "
        "static_graph=True on its first iteration with MARIGOLD (its own per-task passes "
        "cross DDP's sink): construct DDP with static_graph=False; (5) a parameter the forward did not use, "
        "with find_unused_parameters=False (the reduction never completes): construct DDP "
        "with find_unused_parameters=True; (6) parameter_update='direct' (it writes the "
        "shared gradients outside DDP's backward): keep the default 'auto'; (7) a "
        "communication hook that skips the all-reduce (local SGD): pass process_group=None "
        "to balance each rank on its own"
    )
