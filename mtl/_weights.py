"""From a method's host-side output to what a step applies and reports.

:func:`host_weights` calls the method's ``_compute_weights`` on the step's host copy and checks
what it returns (shape ``(K,)`` or ``(blocks, K)``, all finite); :func:`block_weights` and
:func:`head_coefficients` give the coefficients per block and for the head backward;
:func:`balance_info` counts the step and builds its :class:`~mtl.BalanceInfo` (host tensors
only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._info import BalanceInfo, NonFiniteError

if TYPE_CHECKING:
    from ._optimizer import BalancedOptimizer

__all__ = ["balance_info", "block_weights", "head_coefficients", "host_extras", "host_weights"]


def host_weights(
    opt: BalancedOptimizer, values: np.ndarray, block_grams: np.ndarray | None, num_blocks: int
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``(weights, gram, extras)``: the method's coefficients (checked), the summed Gram matrix
    it saw and its diagnostics as ``BalanceInfo.extras``."""
    gram = None if block_grams is None else block_grams.sum(0)
    result = opt._compute_weights(gram, values, block_grams)
    raw, extras = result if isinstance(result, tuple) else (result, {})
    if isinstance(raw, Tensor):  # a subclass written against torch tensors
        raw = raw.detach().to("cpu", torch.float64).numpy()
    weights = np.asarray(raw, dtype=np.float64)
    k = values.shape[0]
    if weights.shape not in ((k,), (num_blocks, k)):
        raise RuntimeError(
            f"{type(opt).__name__}._compute_weights returned shape {weights.shape}, "
            f"expected ({k},) or ({num_blocks}, {k})"
        )
    if not np.isfinite(weights).all():
        raise NonFiniteError(f"{type(opt).__name__} produced non-finite weights {weights}")
    return weights, gram, host_extras(extras)


def block_weights(weights: np.ndarray, num_blocks: int) -> np.ndarray:
    """``(blocks, K)`` coefficients: one row per block (a ``(K,)`` vector is broadcast)."""
    return (
        np.broadcast_to(weights, (num_blocks, weights.shape[-1])) if weights.ndim == 1 else weights
    )


def head_coefficients(weights: np.ndarray, weight_heads: bool) -> list[float] | None:
    """Coefficients of the task losses in the head backward (``None`` = plain sum)."""
    if not weight_heads:
        return None
    return [float(c) for c in (weights if weights.ndim == 1 else weights.mean(0))]


def balance_info(
    opt: BalancedOptimizer,
    level: Literal["representation", "parameters"],
    weights: np.ndarray,
    values: np.ndarray,
    gram: np.ndarray | None,
    block_grams: np.ndarray | None,
    extras: dict[str, Any],
) -> BalanceInfo:
    """The step's :class:`~mtl.BalanceInfo`, every array copied into a host tensor; the step
    counts as one that updated the balancer (``num_steps``; the first one fixes ``num_tasks``)."""
    opt.num_steps += 1
    if opt.num_tasks is None:
        opt.num_tasks = values.shape[0]
    return BalanceInfo(
        weights=torch.from_numpy(np.array(weights, dtype=np.float64)),
        losses=torch.from_numpy(np.array(values, dtype=np.float64)),
        gram=None if gram is None else torch.from_numpy(np.array(gram, dtype=np.float64)),
        level=level,
        block_grams=None if block_grams is None else torch.from_numpy(block_grams.copy()),
        extras=extras,
    )


def host_extras(extras: Mapping[str, Any]) -> dict[str, Any]:
    """A method's diagnostics as ``BalanceInfo.extras``: arrays become (copied) host tensors."""
    return {
        name: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray | np.generic) else v
        for name, v in extras.items()
    }
