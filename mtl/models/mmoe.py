"""Multi-gate Mixture-of-Experts (MMoE, Ma et al., KDD 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._layers import Heads, MultiTaskModel, check_dims, check_int, make_mlp
from ._types import Features, ModelOutput

__all__ = ["MMoE"]


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate and one tower per task.

    With ``e`` the input vector (numeric columns followed by one embedding per categorical
    column), ``E = num_experts`` expert MLPs (``expert_dims``, ReLU) give
    ``X = stack_e expert_e(e)`` of shape ``(B, E, H)``, ``H = expert_dims[-1]``. Task ``k`` has a
    gate ``g_k = softmax(W_k e + b_k)`` of shape ``(B, E)``, the mixture
    ``m_k = Σ_e g_k[:, e] · X[:, e, :]`` and the output ``tower_k(m_k)`` of shape ``(B,)``.

    Balance point (``out.representation``):
        * ``"experts"`` (default): the stacked expert outputs ``X`` ``(B, E, H)``, the tensor every
          task depends on, taken *before* the per-task gates (a task's own gated mixture would
          compare gradients of different tensors). ``shared_parameters()``: embeddings + experts.
          Gates and towers are heads: each gets its own task's unweighted gradient. Note that the
          gates read ``e``, so the embeddings also receive each task's gradient through its own
          gate (unweighted, like head gradients) in addition to the balanced gradient through
          the experts.
        * ``"input"``: the input vector ``e``; everything above the embeddings (experts, gates,
          towers) is treated as the heads and the embeddings receive exactly the balanced
          gradient. ``shared_parameters()``: embeddings only. Needs a categorical column.

    Args (keyword-only):
        num_numeric: number of numeric columns (default 0).
        cardinalities: category count of each categorical column (default none).
        num_tasks: number of tasks ``K``.
        embedding_dim: embedding width per categorical column (default 8).
        sparse: sparse embedding gradients, ``nn.Embedding(sparse=...)`` (default False).
        num_experts: number of experts ``E`` (default 4).
        expert_dims: widths of each expert MLP (default ``(64,)``, at least one layer).
        tower_dims: hidden widths of each tower (default ``(32,)``; may be empty).
        dropout: dropout after every hidden ReLU of experts and towers (default 0.0).
        balance_point: ``"experts"`` (default) or ``"input"``.
    """

    balance_points = ("experts", "input")

    def __init__(
        self,
        *,
        num_numeric: int = 0,
        cardinalities: Sequence[int] = (),
        num_tasks: int,
        embedding_dim: int = 8,
        sparse: bool = False,
        num_experts: int = 4,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        dropout: float = 0.0,
        balance_point: str = "experts",
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
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.expert_dims = check_dims("expert_dims", expert_dims, allow_empty=False)
        self.experts = nn.ModuleList(
            make_mlp(self.input_dim, self.expert_dims, self.dropout)
            for _ in range(self.num_experts)
        )
        self.gates = nn.ModuleList(
            nn.Linear(self.input_dim, self.num_experts) for _ in range(self.num_tasks)
        )
        self.representation_dim = self.expert_dims[-1]
        self.towers = self._make_towers(self.representation_dim)

    def _shared_modules(self) -> list[nn.Module]:
        if self.balance_point == "input":
            return [self.embedding]
        return [self.embedding, self.experts]

    def forward(self, x: Features | Tensor) -> ModelOutput:
        """Return the K task outputs (each ``(B,)``) and the balance-point tensor."""
        e = self.embedding(x)
        if self.balance_point == "input":
            return self._output(e, self._from_input)
        return self._output(*self._experts_and_heads(e))

    def _experts_and_heads(self, e: Tensor) -> tuple[Tensor, Heads]:
        """The stacked expert outputs ``(B, E, H)`` and the gated towers above them."""
        experts = torch.stack([expert(e) for expert in self.experts], dim=1)  # (B, E, H)
        gates = [torch.softmax(gate(e), dim=-1).unsqueeze(1) for gate in self.gates]  # (B, 1, E)

        def heads(stack: Tensor) -> list[Tensor]:
            return [tower(torch.bmm(w, stack).squeeze(1)) for w, tower in zip(gates, self.towers)]

        return experts, heads

    def _from_input(self, e: Tensor) -> list[Tensor]:
        experts, heads = self._experts_and_heads(e)
        return heads(experts)
