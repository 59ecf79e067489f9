"""Input and output containers shared by every multi-task model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.utils._pytree as _pytree
from torch import Tensor

__all__ = ["Features", "ModelOutput"]


class Features(NamedTuple):
    """A batch of tabular inputs.

    Attributes:
        numeric: float tensor of shape ``(B, n_numeric)``, or ``None`` when there is no numeric
            feature.
        categorical: int64 tensor of shape ``(B, n_categorical)`` holding category ids in
            ``[0, cardinality)`` per column, or ``None`` when there is no categorical feature.
    """

    numeric: Tensor | None
    categorical: Tensor | None

    @property
    def batch_size(self) -> int:
        t = self.numeric if self.numeric is not None else self.categorical
        if t is None:
            raise ValueError("Features has neither numeric nor categorical columns")
        return int(t.shape[0])

    def to(self, device: torch.device | str) -> Features:
        return Features(
            None if self.numeric is None else self.numeric.to(device),
            None if self.categorical is None else self.categorical.to(device),
        )


@dataclass
class ModelOutput:
    """What every multi-task model returns.

    Attributes:
        task_outputs: one tensor of shape ``(B,)`` per task: a logit for a binary task, the
            prediction for a regression task.
        representation: the balance point, i.e. the tensor (or tuple of tensors, treated as
            blocks) that every task's output depends on; pass it to
            ``BalancedOptimizer.backward(..., representation=out.representation)``.
        heads: a callable recomputing the K task outputs from a (perturbed) representation,
            reusing every intermediate that does not depend on it (gate weights,
            task-specific experts); ``heads(representation)`` equals ``task_outputs``. Used by
            the perturbation regularizers (LSPR, SCR) and by MARIGOLD's extra forward at the
            representation level. ``None`` when the model does not provide it.
    """

    task_outputs: list[Tensor]
    representation: Tensor | tuple[Tensor, ...]
    heads: Callable[[Tensor], list[Tensor]] | None = None


def _flatten_output(out: ModelOutput) -> tuple[list[object], object]:
    return [out.task_outputs, out.representation], out.heads


def _unflatten_output(values: Iterable[object], heads: object) -> ModelOutput:
    task_outputs, representation = values
    return ModelOutput(task_outputs, representation, heads)  # type: ignore[arg-type]


# A pytree node (like a tuple), not a leaf: DistributedDataParallel finds the tensors of a
# ModelOutput (with static_graph=True its first iteration routes them through its sink node,
# which then queues the delayed all-reduce; a leaf dataclass would leave the ranks unsynced),
# and so do torch.compile and torch.export. ``heads`` travels as the node's context.
_pytree.register_pytree_node(
    ModelOutput,
    _flatten_output,
    _unflatten_output,
    serialized_type_name="mtl.models.ModelOutput",
)
