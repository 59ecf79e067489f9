"""Autograd-graph analysis: what a balanced step needs to know about the graph of the losses.

Three questions, answered by one walk (:func:`analyse_graph`):

* does each task loss reach the balance point (a property of the graph, not of the gradient
  values: a loss like ``0 * z`` depends on ``z``, a loss computed from ``z.detach()`` does not);
* which trainable parameters are each task's heads (what the loss reaches above the balance
  point), and is that split clean (no head parameter, and no graph node, also lies below it);
* does anything trainable lie below the balance point (else the trunk gets no gradient).

The walk above the balance point also collects DDP's ``_DDPSink`` nodes, which the per-task
passes cross (:mod:`mtl._ddp`). A balance-point block may be given as a tensor or as the
:class:`~torch.autograd.graph.GradientEdge` into the node that computes it.

Node identity. ``tensor.grad_fn`` and ``node.next_functions`` return Python wrappers that torch
creates on access and may free as soon as the last reference goes; the same autograd node can
then come back as another object, and a freed object's ``id`` can be reused by an unrelated one.
So no walk here ever keys on ``id()`` of a node object it does not hold: every node is kept in a
set (holding a strong reference keeps torch returning that same wrapper for the node, on every
supported version), and leaves are identified by their ``variable`` tensor (a parameter or input
tensor that the caller owns), never by their ``AccumulateGrad`` wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from ._ddp import Target, is_sink, sink_input, sink_output_error

__all__ = ["GraphAnalysis", "analyse_graph", "depends_on"]


def _edges(node: object) -> list[tuple[object, int]]:
    """The edges ``(node, output_nr)`` into the nodes that compute ``node``'s inputs."""
    return [(c, nr) for c, nr in getattr(node, "next_functions", ()) if c is not None]


def _children(node: object) -> list[object]:
    return [c for c, _ in _edges(node)]


def _leaf_variable(node: object) -> Tensor | None:
    """The tensor an ``AccumulateGrad`` node accumulates into (``None`` for other nodes)."""
    var = getattr(node, "variable", None)
    return var if isinstance(var, Tensor) else None


class _Targets:
    """The tensors a walk looks for: a non-leaf tensor by the edge into it, ``(grad_fn,
    output_nr)`` (the node held alive here; a node with several outputs is reached through one of
    them only), a leaf by the identity of the tensor itself."""

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.edges: set[tuple[object, int]] = set()
        self.leaves: set[int] = set()
        self._keep: list[Tensor] = []
        for t in tensors:
            if t.grad_fn is not None:
                self.edges.add((t.grad_fn, t.output_nr))
            elif t.requires_grad:
                self.leaves.add(id(t))
                self._keep.append(t)

    def hit(self, node: object, nr: int) -> bool:
        if (node, nr) in self.edges:
            return True
        var = _leaf_variable(node)
        return var is not None and id(var) in self.leaves


def depends_on(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[bool]:
    """For each output, whether its autograd graph reaches any of ``inputs``.

    A walk over the graph (no gradient is computed); shared sub-graphs are visited once. Inputs
    may be non-leaf tensors (a representation) or leaves (parameters).
    """
    targets = _Targets(inputs)
    memo: dict[object, bool] = {}  # node -> reaches a target; holds every visited node alive

    def reaches(root: object) -> bool:
        stack: list[tuple[object, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                memo[node] = any(targets.hit(c, nr) or memo.get(c, False) for c, nr in _edges(node))
                continue
            if node in memo:
                continue
            memo[node] = False  # provisional; graphs are acyclic
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if c not in memo)
        return memo[root]

    out = []
    for o in outputs:
        if o.grad_fn is None:
            out.append(targets.hit(_LeafProbe(o), 0))
        else:
            out.append(targets.hit(o.grad_fn, o.output_nr) or reaches(o.grad_fn))
    return out


class _LeafProbe:
    """Stands for an output that is itself a leaf tensor (it reaches only itself)."""

    def __init__(self, t: Tensor) -> None:
        self.variable = t


@dataclass(frozen=True)
class GraphAnalysis:
    """What one walk of the losses' graph found (see :func:`analyse_graph`).

    Attributes:
        reaches: per task, whether its loss reaches some balance-point block.
        heads: per task, the managed parameters its loss reaches above the balance point;
            ``None`` when the split is not clean (a head parameter or graph node also lies below
            the balance point, as with MMoE gates that read the embeddings, or the walk above
            the balance point meets a leaf the optimizer does not manage).
        trunk_blocks: per block, whether some managed parameter lies below it.
        targets: the blocks as given to :func:`analyse_graph` (tensors or gradient edges).
        sinks: the DDP ``_DDPSink`` nodes above the balance point (held alive here).
    """

    reaches: list[bool]
    heads: list[list[Tensor]] | None
    trunk_blocks: list[bool]
    targets: list[Target] = field(default_factory=list)
    sinks: list[object] = field(default_factory=list)


def _edge(target: Target) -> tuple[object, int]:
    """``(node, output_nr)``: the edge into the node that computes ``target``."""
    if isinstance(target, Tensor):
        return target.grad_fn, target.output_nr
    return target.node, target.output_nr


def analyse_graph(
    losses: Sequence[Tensor], blocks: Sequence[Target], managed: set[int]
) -> GraphAnalysis:
    """Walk the graph once below the balance point and once above it, per task.

    Args:
        losses: the K task losses.
        blocks: the balance-point tensors (non-leaf), or gradient edges into their nodes
            (:func:`mtl._ddp.resolve_blocks`).
        managed: ``id`` of every parameter tensor the optimizer manages (tensors are owned by
            the model, so their ids are stable; node wrappers are never keyed by id).

    Raises:
        ValueError: a task loss does not reach a block that DDP's sink returned (the heads
            consumed the tensor before the sink; :func:`mtl._ddp.resolve_blocks` looks
            through it).
    """
    edges_in = [_edge(b) for b in blocks]
    block_edges: set[tuple[object, int]] = set(edges_in)
    below, trunk_blocks = _walk_below([node for node, _ in edges_in], managed)
    reaches: list[bool] = []
    heads: list[list[Tensor]] | None = []
    sinks: list[object] = []
    for loss in losses:
        hit, params = _walk_task(loss, block_edges, below, managed, sinks)
        reaches.append(hit)
        if params is None:
            heads = None
        elif heads is not None:
            heads.append(params)
    if not all(reaches) and any(isinstance(b, Tensor) and is_sink(b.grad_fn) for b in blocks):
        raise sink_output_error("this method")  # resolve_blocks looks through the sink
    return GraphAnalysis(
        reaches=reaches,
        heads=heads,
        trunk_blocks=trunk_blocks,
        targets=list(blocks),
        sinks=sinks,
    )


def _walk_below(block_nodes: Sequence[object], managed: set[int]) -> tuple[set[object], list[bool]]:
    """Every node below (and including) some block's node, and per block whether a managed
    parameter lies below it."""
    below: set[object] = set()
    trunk_blocks = []
    for root in block_nodes:
        found = False
        seen: set[object] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            var = _leaf_variable(node)
            if var is not None:
                found = found or id(var) in managed
                continue
            stack.extend(_children(node))
        below |= seen
        trunk_blocks.append(found)
    return below, trunk_blocks


def _walk_task(
    loss: Tensor,
    block_edges: set[tuple[object, int]],
    below: set[object],
    managed: set[int],
    sinks: list[object],
) -> tuple[bool, list[Tensor] | None]:
    """One task's walk above the balance point: whether its loss reaches a block, and the
    managed parameters it reaches on the way (``None`` when the split is not clean). DDP sink
    nodes met on the way are appended to ``sinks`` (once each)."""
    hit = False
    clean = True
    params: dict[int, Tensor] = {}
    seen: set[object] = set()
    edges: list[tuple[object, int]] = (
        [(loss.grad_fn, loss.output_nr)] if loss.grad_fn is not None else []
    )
    while edges:
        node, nr = edges.pop()
        if (node, nr) in block_edges:
            hit = True  # stop at the balance point
            continue
        if is_sink(node):  # the identity: on along the input this output passes on
            if all(node is not s for s in sinks):
                sinks.append(node)
            through = sink_input(node, nr)
            if through is not None:
                edges.append(through)
            continue
        if node in seen:
            continue
        seen.add(node)
        if node in below:
            clean = False  # the heads share graph with the trunk
            hit = hit or _reaches_any(node, block_edges)
            continue
        var = _leaf_variable(node)
        if var is not None:
            if id(var) in managed:
                params[id(var)] = var
            else:
                clean = False  # an unmanaged leaf above the balance point
            continue
        edges.extend(_edges(node))
    return hit, list(params.values()) if clean else None


def _reaches_any(root: object, targets: set[tuple[object, int]]) -> bool:
    """Whether ``root``'s sub-graph contains one of the edges ``targets`` (held by the caller)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for edge in _edges(node):
            if edge in targets:
                return True
            stack.append(edge[0])
    return False
