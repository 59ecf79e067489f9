"""Input checks of a balanced step: every bad input gets an error that names the problem.

None of these reads a tensor's values (no device synchronization): they look at types, shapes,
``requires_grad`` and graph structure only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._graph import GraphAnalysis

__all__ = [
    "check_closure_losses",
    "closure_arity_mismatch",
    "check_losses",
    "check_parameters",
    "check_reached",
    "check_representation",
    "check_trunk",
    "unreached_error",
]

Namer = Callable[[int], str]


def check_losses(
    losses: Sequence[Tensor] | Tensor, num_tasks: int | None, name: Namer
) -> list[Tensor]:
    """K scalar tensors that require grad (a sequence, or a 1-D tensor of length K)."""
    items = _items(
        losses,
        "losses given as a tensor must be 1-D of length K, got shape {shape}",
        "losses must be a sequence of scalar tensors or a 1-D tensor, got {type}",
    )
    if len(items) == 0:
        raise ValueError("losses is empty")
    if num_tasks is not None and len(items) != num_tasks:
        raise ValueError(f"expected {num_tasks} losses (num_tasks), got {len(items)}")
    for k, loss in enumerate(items):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss of {name(k)} is a {type(loss).__name__}, not a Tensor")
        if loss.dim() != 0:
            raise ValueError(
                f"loss of {name(k)} must be a scalar tensor, got shape {tuple(loss.shape)}"
                " (reduce it with .mean() or .sum())"
            )
        if not loss.requires_grad:
            raise ValueError(f"loss of {name(k)} does not require grad")
    return items


def _items(value: Any, not_1d: str, not_a_sequence: str) -> list[Any]:
    """The K entries of a 1-D tensor or a list/tuple of losses; ValueError ``not_1d`` (a
    template with ``{shape}``) for a tensor of another dimension, TypeError ``not_a_sequence``
    (with ``{type}``) for anything else."""
    if isinstance(value, Tensor):
        if value.dim() != 1:
            raise ValueError(not_1d.replace("{shape}", str(tuple(value.shape))))
        return list(value.unbind(0))
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(not_a_sequence.replace("{type}", type(value).__name__))


def _where(b: int, n: int) -> str:
    return "representation" if n == 1 else f"representation block {b}"


def check_representation(representation: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The balance point as a list of blocks: non-leaf tensors that require grad."""
    if isinstance(representation, Tensor):
        blocks = [representation]
    elif isinstance(representation, (list, tuple)) and len(representation) > 0:
        blocks = list(representation)
    else:
        raise TypeError(
            "representation must be a tensor or a non-empty tuple/list of tensors, got "
            f"{type(representation).__name__}"
        )
    for b, z in enumerate(blocks):
        where = _where(b, len(blocks))
        if not isinstance(z, Tensor):
            raise TypeError(f"{where} is a {type(z).__name__}, not a Tensor")
        if not z.requires_grad:
            raise ValueError(
                f"{where} does not require grad: it is detached from the trunk, so the "
                "shared layers would receive no gradient"
            )
        if z.grad_fn is None:
            raise ValueError(
                f"{where} is a leaf tensor: nothing below it would receive the balanced "
                "gradient. Pass the output of the shared trunk, or use shared_parameters="
            )
    return blocks


def check_parameters(shared_parameters: Iterable[Tensor], managed: set[int]) -> list[Tensor]:
    """The shared parameters: distinct tensors that require grad and the optimizer manages."""
    if isinstance(shared_parameters, Tensor):
        raise TypeError(
            "shared_parameters must be an iterable of parameters, got a single tensor "
            "(wrap it in a list)"
        )
    params = list(shared_parameters)
    if not params:
        raise ValueError("shared_parameters is empty")
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_parameters[{i}] is a {type(p).__name__}, not a Tensor")
        if not p.requires_grad:
            raise ValueError(f"shared_parameters[{i}] does not require grad")
        if id(p) in seen:
            raise ValueError(f"shared_parameters[{i}] appears twice")
        if id(p) not in managed:
            raise ValueError(
                f"shared_parameters[{i}] (shape {tuple(p.shape)}) is not managed by the inner "
                "optimizer, so it would never be updated"
            )
        seen.add(id(p))
    return params


def check_trunk(analysis: GraphAnalysis) -> None:
    """Raise when no trainable parameter lies below some balance-point block (the trunk would
    receive no gradient, e.g. a representation rebuilt from a detached tensor)."""
    n = len(analysis.trunk_blocks)
    for b, ok in enumerate(analysis.trunk_blocks):
        if not ok:
            raise ValueError(
                f"no trainable parameter lies below the {_where(b, n)}: the shared trunk would "
                "receive no gradient (is the representation computed from a detached "
                "tensor?)"
            )


def unreached_error(bad: Sequence[int], name: Namer) -> ValueError:
    names = ", ".join(name(k) for k in bad)
    return ValueError(
        f"the loss of {names} does not depend on the representation: its graph never "
        "reaches the given tensor (was it computed from a detached copy, or from another "
        "tensor than the one the heads consume? With torch.compile, compile the trunk and "
        "the heads as separate regions so the representation is a boundary between them, "
        "or balance at shared_parameters=)"
    )


def check_reached(reached: Sequence[bool], name: Namer, *, parameters: bool = False) -> None:
    """Raise, naming the tasks, when some task loss does not reach the balance point."""
    bad = [k for k, r in enumerate(reached) if not r]
    if not bad:
        return
    if parameters:
        names = ", ".join(name(k) for k in bad)
        raise ValueError(f"the loss of {names} does not depend on any of the shared_parameters")
    raise unreached_error(bad, name)


def check_closure_losses(
    out: Any, k: int, device: torch.device, name: Namer, who: str = "closure"
) -> Tensor:
    """What a closure returned (K scalars: a sequence or a 1-D tensor) as a ``(K,)`` float64
    tensor on ``device``, detached; a clear error names ``who`` and the task otherwise."""
    items = _items(
        out,
        f"{who} must return K scalar losses (a sequence or a 1-D tensor of length K={k}); got "
        "a tensor of shape {shape}",
        f"{who} must return K scalar losses (a sequence of scalar tensors or a 1-D tensor); "
        "got {type}",
    )
    if len(items) != k:
        raise ValueError(
            f"{who} returned {len(items)} losses, expected K={k} (one per task, in the "
            "order of the losses passed to backward)"
        )
    vals = []
    for i, v in enumerate(items):
        t = v.detach() if isinstance(v, Tensor) else torch.as_tensor(v)
        if t.numel() != 1:
            raise ValueError(
                f"{who} loss of {name(i)} must be a scalar, got shape {tuple(t.shape)}"
            )
        vals.append(t.reshape(()).to(device=device, dtype=torch.float64))
    return torch.stack(vals)


def closure_arity_mismatch(closure: Any, nargs: int) -> inspect.Signature | None:
    """The signature of ``closure`` when it cannot be called with ``nargs`` positional
    arguments, for the caller's error message; ``None`` when it can (or has no signature, as
    some builtins: trusted). :class:`TypeError` when ``closure`` is not callable at all."""
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    try:
        sig = inspect.signature(closure)
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return None
    try:
        sig.bind(*[None] * nargs)
    except TypeError:
        return sig
    return None
