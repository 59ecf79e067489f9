"""Multi-tower ranking models for tabular inputs: SharedBottom, MMoE, PLE.

Every model takes ``model(x)`` with ``x`` a :class:`Features` (numeric and/or categorical columns)
or a plain float tensor ``(B, num_numeric)`` (numeric-only), and returns a :class:`ModelOutput`
with one output of shape ``(B,)`` per task (logits for binary tasks) and ``representation``, the
balance point to pass to ``BalancedOptimizer.backward(..., representation=...)``. Each model also
offers ``shared_parameters()`` for parameter-level balancing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._layers import MultiTaskModel
from ._types import Features, ModelOutput
from .mmoe import MMoE
from .ple import PLE
from .shared_bottom import SharedBottom

__all__ = [
    "MODELS",
    "MMoE",
    "PLE",
    "Features",
    "ModelOutput",
    "MultiTaskModel",
    "SharedBottom",
    "build_model",
]

MODELS: dict[str, type[MultiTaskModel]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
}


def build_model(
    name: str,
    *,
    num_numeric: int,
    cardinalities: Sequence[int],
    num_tasks: int,
    **kwargs: Any,
) -> MultiTaskModel:
    """Build a model by name: ``"shared_bottom"``, ``"mmoe"`` or ``"ple"``.

    ``kwargs`` are the model's own keyword options (``embedding_dim``, ``sparse``, ``tower_dims``,
    ``dropout``, ``balance_point``, ``bottom_dims`` / ``num_experts`` / ``expert_dims`` /
    ``num_levels`` / ``num_shared_experts`` / ``num_task_experts``). Raises ``ValueError`` for an
    unknown name and ``TypeError`` for an option the model does not take.
    """
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[key](
        num_numeric=num_numeric, cardinalities=cardinalities, num_tasks=num_tasks, **kwargs
    )
