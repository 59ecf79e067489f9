"""PCGrad (Yu et al., NeurIPS 2020, "Gradient Surgery for Multi-Task Learning"), from the Gram matrix.

For each task ``i`` and each other task ``j`` in a random order::

    if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j / |g_j|^2) g_j

(projection against the ORIGINAL ``g_j``, as in the paper's Algorithm 1), then
``update = sum_i g_i^PC`` (or the mean). Every ``g_i^PC`` stays a linear combination of the
original gradients, ``g_i^PC = sum_k C[i, k] g_k``, and each step only needs inner products
``g_i^PC . g_j = (C[i] M)_j`` and ``|g_j|^2 = M_jj``, so the whole method is a function of the
Gram matrix ``M`` and runs through :class:`mtl.BalancedOptimizer` at the representation level
and at the parameter level without materialising any projected gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from .gradops import DEFAULT_EPS, _as_gram, _check_choice, _check_positive

__all__ = ["PCGrad", "pcgrad_coefficients", "pcgrad_orders", "pcgrad_projections"]

Reduction = Literal["sum", "mean"]
_REDUCTIONS = ("sum", "mean")

Orders = torch.Generator | Tensor | np.ndarray | Sequence[int] | Sequence[Sequence[int]]


def pcgrad_orders(num_tasks: int, generator: torch.Generator) -> Tensor:
    """Random visiting orders: row ``i`` is ``torch.randperm(K, generator=generator)``.

    One fresh permutation of all ``K`` tasks per task ``i`` (task ``i`` itself is skipped when
    projecting), drawn in the order ``i = 0..K-1``: ``K`` calls to ``randperm`` per step, the
    same structure as the per-task ``random.shuffle`` of the common PyTorch port.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return torch.stack(
        [
            torch.randperm(num_tasks, generator=generator, device=generator.device).cpu()
            for _ in range(num_tasks)
        ]
    )


def _normalise_orders(orders: Orders, k: int) -> np.ndarray:
    """``(K, K)`` int array: row ``i`` lists the tasks visited for task ``i`` (``i`` included)."""
    if isinstance(orders, torch.Generator):
        return pcgrad_orders(k, orders).numpy()
    arr = orders.detach().cpu().numpy() if isinstance(orders, Tensor) else np.asarray(orders)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError("orders must be integer task indices (a sequence or a (K, ·) array)")
    if arr.ndim == 1:
        arr = np.tile(arr, (k, 1))
    if arr.ndim != 2 or arr.shape[0] != k:
        raise ValueError(
            f"orders must be a torch.Generator, one order of the K={k} tasks, or one order per "
            f"task (K rows); got shape {arr.shape}"
        )
    rows = []
    for i in range(k):
        row = [int(j) for j in arr[i] if int(j) != i]
        if sorted(row) != [j for j in range(k) if j != i]:
            raise ValueError(
                f"orders[{i}] = {arr[i].tolist()} must list every other task 0..{k - 1} exactly "
                "once (task i itself may appear, it is skipped)"
            )
        rows.append([i, *row])  # self first: a no-op, kept so every row has length K
    return np.asarray(rows, dtype=np.int64)


def pcgrad_projections(
    gram: Tensor | np.ndarray, orders: Orders, *, eps: float = DEFAULT_EPS
) -> tuple[Tensor, dict[str, Any]]:
    """PCGrad's projected gradients as a ``(K, K)`` matrix: ``g_i^PC = sum_k C[i, k] g_k``.

    For ``i = 0..K-1``: start from ``C[i] = e_i``; for ``j`` in ``orders[i]`` (``j != i``): if
    ``d = (C[i] M)_j < 0`` then ``C[i, j] -= d / M_jj``. Tasks with a zero gradient
    (``M_jj <= eps * max_k M_kk``) are never projected against.

    Args:
        gram: ``(K, K)`` Gram matrix ``M_ij = g_i . g_j``.
        orders: a ``torch.Generator`` (orders drawn with :func:`pcgrad_orders`), one order of
            the tasks used for every ``i`` (e.g. ``[0, 1, 2]``), or one order per task (``K``
            rows). Each row lists every other task once; task ``i`` itself may appear (skipped).
        eps: relative squared-norm threshold for zero-gradient tasks (default ``1e-30``).

    Returns:
        ``(C, info)``: ``C`` float64 ``(K, K)``; ``info`` has ``orders`` (int64 ``(K, K)``, row
        ``i`` = the order used for task ``i``, starting with ``i`` itself), ``projected`` (bool
        ``(K, K)``: ``g_i`` was projected against ``g_j``) and ``num_projections``.
    """
    m, device = _as_gram(gram)
    eps = _check_positive("eps", eps, allow_zero=True)
    k = m.shape[0]
    order = _normalise_orders(orders, k)
    diag = np.clip(np.diag(m), 0.0, None)
    scale = float(diag.max())
    usable = diag > eps * scale if scale > 0 else np.zeros(k, dtype=bool)
    coef = np.eye(k)
    projected = np.zeros((k, k), dtype=bool)
    for i in range(k):
        row = coef[i]
        dots = m[i].copy()  # dots[j] = g_i^PC . g_j, updated after every projection
        for j in order[i, 1:].tolist():
            d = dots[j]
            if d < 0.0 and usable[j]:
                step = -d / m[j, j]
                row[j] += step
                dots += step * m[j]
                projected[i, j] = True
    info: dict[str, Any] = {
        "orders": torch.from_numpy(order),
        "projected": torch.from_numpy(projected),
        "num_projections": int(projected.sum()),
    }
    return torch.from_numpy(coef).to(device), info


def pcgrad_coefficients(
    gram: Tensor | np.ndarray,
    orders: Orders,
    *,
    reduction: Reduction = "sum",
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """PCGrad coefficients: ``update = sum_i g_i^PC = sum_k c_k g_k`` with ``c = C^T 1``.

    ``reduction="mean"`` divides by ``K``. See :func:`pcgrad_projections` for ``orders``
    (a ``torch.Generator`` is advanced by ``K`` ``randperm`` draws).

    Returns:
        float64 ``(K,)`` coefficients.
    """
    reduction = _check_choice("reduction", reduction, _REDUCTIONS)  # type: ignore[assignment]
    coef, _ = pcgrad_projections(gram, orders, eps=eps)
    c = coef.sum(0)
    return c / coef.shape[0] if reduction == "mean" else c


class PCGrad(BalancedOptimizer):
    """PCGrad: project each task gradient away from the gradients it conflicts with.

    Formula (Yu et al., NeurIPS 2020, Algorithm 1): for each task ``i``, for each other task
    ``j`` in a random order, if ``g_i^PC . g_j < 0`` then
    ``g_i^PC <- g_i^PC - (g_i^PC . g_j / |g_j|^2) g_j`` (against the original ``g_j``); the
    shared part receives ``sum_i g_i^PC`` (``reduction="sum"``, Algorithm 1 of the paper) or the
    mean (``"mean"``, the default of the common PyTorch port). Computed from the Gram matrix only
    (:func:`pcgrad_projections`), so it works with ``representation=`` and with
    ``shared_parameters=``. For two conflicting tasks the result equals GradOPS with
    ``alpha = 0``; for three or more tasks it depends on the order and can conflict with an
    original gradient (the motivation of GradOPS).

    The random orders come from a ``torch.Generator`` seeded with ``seed``: ``K`` draws of
    ``torch.randperm(K)`` per step (:func:`pcgrad_orders`). Its state is part of
    :meth:`state_dict`, so a save/load round trip continues with the same orders. Under
    ``torch.distributed`` use the same ``seed`` on every rank (the default) so the ranks agree.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        seed: seed of the order generator (default ``0``).
        reduction: ``"sum"`` (default) or ``"mean"``.
        eps: relative squared-norm threshold below which a task gradient counts as zero and is
            never projected against (default ``1e-30``).
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.extras``: ``orders`` (``(K, K)``, row ``i`` = visiting order for task ``i``),
    ``projected`` (``(K, K)`` bool) and ``num_projections``.

    Cost: the per-task gradients and their Gram matrix (base class) plus ``O(K^3)`` scalar work.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        seed: int = 0,
        reduction: Reduction = "sum",
        eps: float = DEFAULT_EPS,
        **kwargs: Any,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        reduction = _check_choice("reduction", reduction, _REDUCTIONS)  # type: ignore[assignment]
        eps = _check_positive("eps", eps, allow_zero=True)
        super().__init__(optimizer, num_tasks, **kwargs)
        self.seed = seed
        self.reduction = reduction
        self.eps = eps
        self.generator = torch.Generator().manual_seed(seed)
        self._last: dict[str, Any] = {}

    def _repr_options(self) -> str:
        return f"seed={self.seed}, reduction={self.reduction!r}, {super()._repr_options()}"

    def _balancer_state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        gen = state.get("generator")
        if not isinstance(gen, Tensor):
            raise ValueError("PCGrad state_dict has no generator state")
        self.seed = int(state.get("seed", self.seed))
        self.generator.set_state(gen.to(torch.uint8))

    def _compute_weights(
        self, gram: Tensor | None, losses: Tensor, block_grams: Tensor | None
    ) -> Tensor:
        if gram is None:
            raise RuntimeError("PCGrad needs the Gram matrix of the task gradients")
        orders = pcgrad_orders(gram.shape[0], self.generator)
        coef, info = pcgrad_projections(gram, orders, eps=self.eps)
        c = coef.sum(0)
        if self.reduction == "mean":
            c = c / coef.shape[0]
        self._last = info
        return c

    def _extras(self) -> dict[str, Any]:
        return dict(self._last)
