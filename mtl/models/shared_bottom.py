"""Shared-bottom multi-task model: one bottom MLP shared by all tasks, one tower per task."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._layers import MultiTaskModel, check_dims, make_mlp
from ._types import Features, ModelOutput

__all__ = ["SharedBottom"]


class SharedBottom(MultiTaskModel):
    """Shared-bottom model: embeddings → bottom MLP → ``z`` → one tower per task.

    The input vector ``e`` (numeric columns followed by one embedding per categorical column)
    goes through the bottom MLP ``bottom_dims`` (ReLU, optional dropout) giving ``z`` of shape
    ``(B, bottom_dims[-1])``; tower ``k`` (MLP ``tower_dims`` then ``Linear(→ 1)``) maps ``z`` to
    the task's output of shape ``(B,)``.

    Balance point (``out.representation``):
        * ``"bottom"`` (default): ``z``, the bottom's output, the last tensor every tower reads.
          ``shared_parameters()``: embeddings + bottom MLP.
        * ``"input"``: the input vector ``e``; the bottom MLP then counts as part of the heads
          (each task's own unweighted gradient) and only the embeddings receive the balanced
          gradient. ``shared_parameters()``: embeddings only. Needs a categorical column.

    Args (keyword-only):
        num_numeric: number of numeric columns (default 0).
        cardinalities: category count of each categorical column (default none).
        num_tasks: number of tasks ``K``.
        embedding_dim: embedding width per categorical column (default 8).
        sparse: sparse embedding gradients, ``nn.Embedding(sparse=...)`` (default False).
        bottom_dims: widths of the bottom MLP (default ``(128, 64)``, at least one layer).
        tower_dims: hidden widths of each tower (default ``(32,)``; may be empty).
        dropout: dropout after every hidden ReLU (default 0.0).
        balance_point: ``"bottom"`` (default) or ``"input"``.
    """

    balance_points = ("bottom", "input")

    def __init__(
        self,
        *,
        num_numeric: int = 0,
        cardinalities: Sequence[int] = (),
        num_tasks: int,
        embedding_dim: int = 8,
        sparse: bool = False,
        bottom_dims: Sequence[int] = (128, 64),
        tower_dims: Sequence[int] = (32,),
        dropout: float = 0.0,
        balance_point: str = "bottom",
    ):
        super().__init__(
            num_numeric=num_numeric,
            cardinalities=cardinalities,
            num_tasks=num_tasks,
            embedding_dim=embedding_dim,
            sparse=sparse,
            tower_dims=tower_dims,
            dropout=dropout,
            balance_point=balance_point,
        )
        self.bottom_dims = check_dims("bottom_dims", bottom_dims, allow_empty=False)
        self.bottom = make_mlp(self.input_dim, self.bottom_dims, self.dropout)
        self.representation_dim = self.bottom_dims[-1]
        self.towers = self._make_towers(self.representation_dim)

    def _shared_modules(self) -> list[nn.Module]:
        if self.balance_point == "input":
            return [self.embedding]
        return [self.embedding, self.bottom]

    def forward(self, x: Features | Tensor) -> ModelOutput:
        """Return the K task outputs (each ``(B,)``) and the balance-point tensor."""
        e = self.embedding(x)
        if self.balance_point == "input":
            return self._output(e, self._from_input)
        return self._output(self.bottom(e), self._from_bottom)

    def _from_bottom(self, z: Tensor) -> list[Tensor]:
        return [tower(z) for tower in self.towers]

    def _from_input(self, e: Tensor) -> list[Tensor]:
        return self._from_bottom(self.bottom(e))
