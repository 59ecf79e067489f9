"""Progressive Layered Extraction (PLE, Tang et al., RecSys 2020); CGC when ``num_levels=1``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from ._layers import Heads, MultiTaskModel, check_dims, check_int, make_mlp
from ._types import Features, ModelOutput

__all__ = ["PLE"]


def _mix(gate: nn.Module, gate_input: Tensor, experts: Tensor) -> Tensor:
    """Softmax-gated mixture: ``Σ_e softmax(gate(x))[:, e] · experts[:, e, :]`` → ``(B, H)``."""
    return torch.bmm(_gate_weights(gate, gate_input), experts).squeeze(1)


def _gate_weights(gate: nn.Module, gate_input: Tensor) -> Tensor:
    """``softmax(gate(x))`` as ``(B, 1, E)``, ready for a batched product with ``(B, E, H)``."""
    return torch.softmax(gate(gate_input), dim=-1).unsqueeze(1)


def _stack(experts: nn.Module, x: Tensor) -> Tensor:
    """The outputs of a ``ModuleList`` of experts on ``x``, stacked as ``(B, E, H)``."""
    return torch.stack([f(x) for f in cast(nn.ModuleList, experts)], dim=1)


class _ExtractionLevel(nn.Module):
    """One PLE extraction level (a CGC block): shared experts, per-task experts, gates.

    Task ``k``'s gate reads task ``k``'s input and mixes task ``k``'s experts and the shared
    experts. If ``shared_gate`` is set (every level but the last), a shared gate reads the shared
    input and mixes *all* experts of the level into the next level's shared input.
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_dims: Sequence[int],
        dropout: float,
        shared_gate: bool,
    ):
        super().__init__()
        self.shared_experts = nn.ModuleList(
            make_mlp(in_dim, expert_dims, dropout) for _ in range(num_shared_experts)
        )
        self.task_experts = nn.ModuleList(
            nn.ModuleList(make_mlp(in_dim, expert_dims, dropout) for _ in range(num_task_experts))
            for _ in range(num_tasks)
        )
        self.task_gates = nn.ModuleList(
            nn.Linear(in_dim, num_task_experts + num_shared_experts) for _ in range(num_tasks)
        )
        self.shared_gate: nn.Linear | None = (
            nn.Linear(in_dim, num_tasks * num_task_experts + num_shared_experts)
            if shared_gate
            else None
        )

    def forward(
        self, task_inputs: Sequence[Tensor], shared_input: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        """Return (per-task outputs ``(B, H)``, next shared input or None)."""
        shared, owns, gates = self.parts(task_inputs, shared_input)
        task_outputs = self.mix(owns, gates, shared)
        if self.shared_gate is None:
            return task_outputs, None
        every = torch.cat([*(own for own in owns if own is not None), shared], 1)
        return task_outputs, _mix(self.shared_gate, shared_input, every)

    def parts(
        self, task_inputs: Sequence[Tensor], shared_input: Tensor
    ) -> tuple[Tensor, list[Tensor | None], list[Tensor]]:
        """The shared expert stack ``(B, Es, H)``, each task's own expert stack ``(B, Et, H)``
        (``None`` without task experts) and each task's gate weights ``(B, 1, Et + Es)``."""
        shared = _stack(self.shared_experts, shared_input)
        owns = [
            _stack(experts_k, x_k) if len(cast(nn.ModuleList, experts_k)) > 0 else None
            for x_k, experts_k in zip(task_inputs, self.task_experts)
        ]
        gates = [_gate_weights(g, x_k) for g, x_k in zip(self.task_gates, task_inputs)]
        return shared, owns, gates

    @staticmethod
    def mix(owns: Sequence[Tensor | None], gates: Sequence[Tensor], shared: Tensor) -> list[Tensor]:
        """Each task's gated mixture ``(B, H)`` of its own experts and the shared stack."""
        mixtures = []
        for own, w in zip(owns, gates):
            candidates = shared if own is None else torch.cat([own, shared], dim=1)
            mixtures.append(torch.bmm(w, candidates).squeeze(1))
        return mixtures


class PLE(MultiTaskModel):
    """Progressive Layered Extraction: stacked levels of shared and task-specific experts.

    Each of the ``num_levels`` extraction levels has ``num_shared_experts`` shared experts and
    ``num_task_experts`` experts per task (MLPs ``expert_dims``, ReLU; ``H = expert_dims[-1]``).
    Task ``k``'s gate (softmax over a linear map of task ``k``'s input) mixes task ``k``'s experts
    with the shared experts; every level except the last also has a shared gate over *all* of
    its experts whose mixture is the next level's shared input. Level 1 reads the input vector
    ``e`` everywhere; level ``l > 1`` reads the task-``k`` mixture of level ``l-1`` in task ``k``'s
    experts and gate, and the shared mixture in its shared experts. Tower ``k`` maps the last
    level's task-``k`` mixture to the output ``(B,)``. ``num_levels=1`` is CGC (Customized Gate
    Control).

    Balance point (``out.representation``):
        * ``"shared_experts"`` (default): the stacked outputs of the LAST level's shared experts,
          shape ``(B, num_shared_experts, H)``: the only tensor that every task gate of the last
          level reads, hence that every task output depends on. Consequence: task-specific
          experts and gates (and the towers) are heads and get their own task's gradient,
          unweighted. The embeddings and, when ``num_levels > 1``, the shared experts of earlier
          levels receive the balanced gradient through the representation *plus* unweighted
          per-task gradients through the task-specific experts and gates that read them; the
          task-specific experts of intermediate levels likewise feed the shared gate and so
          receive the balanced gradient too (they are still reported as task parameters).
          ``shared_parameters()``: embeddings + the shared experts of every level + the shared
          gates of the intermediate levels.
        * ``"input"``: the input vector ``e``; everything above the embeddings is treated as the
          heads and the embeddings receive exactly the balanced gradient.
          ``shared_parameters()``: embeddings only. Needs a categorical column.

    Args (keyword-only):
        num_numeric: number of numeric columns (default 0).
        cardinalities: category count of each categorical column (default none).
        num_tasks: number of tasks ``K``.
        embedding_dim: embedding width per categorical column (default 8).
        sparse: sparse embedding gradients, ``nn.Embedding(sparse=...)`` (default False).
        num_levels: number of extraction levels (default 1 = CGC).
        num_shared_experts: shared experts per level (default 2, at least 1).
        num_task_experts: experts per task per level (default 2, may be 0).
        expert_dims: widths of each expert MLP (default ``(64,)``, at least one layer).
        tower_dims: hidden widths of each tower (default ``(32,)``; may be empty).
        dropout: dropout after every hidden ReLU of experts and towers (default 0.0).
        balance_point: ``"shared_experts"`` (default) or ``"input"``.

    Reference: H. Tang, J. Liu, M. Zhao, X. Gong, "Progressive Layered Extraction (PLE): A Novel
    Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020.
    """

    balance_points = ("shared_experts", "input")

    def __init__(
        self,
        *,
        num_numeric: int = 0,
        cardinalities: Sequence[int] = (),
        num_tasks: int,
        embedding_dim: int = 8,
        sparse: bool = False,
        num_levels: int = 1,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        dropout: float = 0.0,
        balance_point: str = "shared_experts",
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
        self.num_levels = check_int("num_levels", num_levels, minimum=1)
        self.num_shared_experts = check_int("num_shared_experts", num_shared_experts, minimum=1)
        self.num_task_experts = check_int("num_task_experts", num_task_experts, minimum=0)
        self.expert_dims = check_dims("expert_dims", expert_dims, allow_empty=False)
        self.representation_dim = self.expert_dims[-1]
        self.levels = nn.ModuleList(
            _ExtractionLevel(
                self.input_dim if i == 0 else self.representation_dim,
                self.num_tasks,
                self.num_shared_experts,
                self.num_task_experts,
                self.expert_dims,
                self.dropout,
                shared_gate=i < self.num_levels - 1,
            )
            for i in range(self.num_levels)
        )
        self.towers = self._make_towers(self.representation_dim)

    def _level_list(self) -> list[_ExtractionLevel]:
        return cast(list[_ExtractionLevel], list(self.levels))

    def _shared_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = [self.embedding]
        if self.balance_point == "input":
            return modules
        for level in self._level_list():
            modules.append(level.shared_experts)
            if level.shared_gate is not None:
                modules.append(level.shared_gate)
        return modules

    def forward(self, x: Features | Tensor) -> ModelOutput:
        """Return the K task outputs (each ``(B,)``) and the balance-point tensor."""
        e = self.embedding(x)
        if self.balance_point == "input":
            return self._output(e, self._from_input)
        return self._output(*self._shared_and_heads(e))

    def _shared_and_heads(self, e: Tensor) -> tuple[Tensor, Heads]:
        """The last level's shared expert stack and everything above it (task experts and
        gates of the last level, towers), from the input vector ``e``."""
        levels = self._level_list()
        task_inputs: list[Tensor] = [e] * self.num_tasks
        shared_input = e
        for level in levels[:-1]:
            task_inputs, next_shared = level(task_inputs, shared_input)
            assert next_shared is not None  # every level but the last has a shared gate
            shared_input = next_shared
        last = levels[-1]
        shared, owns, gates = last.parts(task_inputs, shared_input)

        def heads(stack: Tensor) -> list[Tensor]:
            mixtures = last.mix(owns, gates, stack)
            return [tower(m) for tower, m in zip(self.towers, mixtures)]

        return shared, heads

    def _from_input(self, e: Tensor) -> list[Tensor]:
        shared, heads = self._shared_and_heads(e)
        return heads(shared)
