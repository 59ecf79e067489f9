"""The record returned by every balanced backward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

__all__ = ["BalanceInfo", "NonFiniteError"]


class NonFiniteError(ValueError):
    """A task loss or task gradient is NaN or infinite."""


@dataclass(frozen=True)
class BalanceInfo:
    """What a balanced backward pass computed.

    Attributes:
        weights: coefficients ``c`` applied to the task gradients on the shared part: shape
            ``(K,)``, or ``(blocks, K)`` for per-block methods (MultiBalance with several
            representation tensors, MetaBalance semantics at parameter level). For methods
            that project gradients (GradOPS, PCGrad; ``weights_kind == "coefficients"`` on the
            optimizer class) these are the coefficients of the projected update expanded over
            the original gradients, not weights: they can be negative or large
            (e.g. ``[26, -105, 1]``).
        losses: detached task losses, shape ``(K,)``, float64 (under DDP: averaged over ranks).
        gram: ``(K, K)`` float64 Gram matrix ``M_ij = <g_i, g_j>`` of the task gradients at the
            balance point, summed over blocks; ``None`` where it was not computed.
        level: ``"representation"`` or ``"parameters"``.
        block_grams: ``(blocks, K, K)`` per-block Gram matrices, or ``None``.
        skipped: ``True`` when a non-finite loss or gradient made the wrapper skip this step
            (``on_nonfinite="skip"``); the balancer state was left untouched.
        extras: method-specific diagnostics (for example GradOPS's trade-off weights).
    """

    weights: Tensor
    losses: Tensor
    gram: Tensor | None
    level: Literal["representation", "parameters"]
    block_grams: Tensor | None = None
    skipped: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return int(self.losses.shape[0])
