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

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._host import check_gram, host_array, host_gram, to_torch
from ._options import check_choice, check_positive
from ._rng import pcg64, rng_from_state, rng_from_torch_state

__all__ = ["PCGrad", "pcgrad_coefficients", "pcgrad_orders", "pcgrad_projections"]

Reduction = Literal["sum", "mean"]
_REDUCTIONS = ("sum", "mean")

#: default squared-cosine threshold: a conflict counts when ``cos^2(g_i^PC, g_j) > eps``
DEFAULT_EPS = 1e-30
#: float64 machine epsilon (2^-52)
_EPS = float(np.finfo(np.float64).eps)

Orders = (
    np.random.Generator
    | torch.Generator
    | Tensor
    | np.ndarray
    | Sequence[int]
    | Sequence[Sequence[int]]
)


def _pcgrad_orders_np(num_tasks: int, rng: np.random.Generator) -> np.ndarray:
    """Random visiting orders on the host: row ``i`` is an independent permutation of ``0..K-1``.

    One ``rng.permuted`` call shuffles each row of a ``(K, K)`` table of ``arange(K)``
    independently (the same structure as the per-task ``random.shuffle`` of the common PyTorch
    port: one fresh permutation of all ``K`` tasks per task ``i``; task ``i`` itself is skipped
    when projecting).
    """
    return rng.permuted(np.tile(np.arange(num_tasks, dtype=np.int64), (num_tasks, 1)), axis=1)


def pcgrad_orders(num_tasks: int, generator: torch.Generator | np.random.Generator) -> Tensor:
    """Random visiting orders, a ``(K, K)`` int64 CPU tensor: row ``i`` is the order for task ``i``.

    With a ``np.random.Generator`` (what :class:`PCGrad` uses): :func:`_pcgrad_orders_np`, one
    independent permutation of ``0..K-1`` per row. With a ``torch.Generator``: row ``i`` is
    ``torch.randperm(K, generator=generator)``, drawn in the order ``i = 0..K-1``.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(_pcgrad_orders_np(num_tasks, generator))
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator or a numpy.random.Generator, got "
            f"{type(generator).__name__}"
        )
    return torch.stack(
        [
            torch.randperm(num_tasks, generator=generator, device=generator.device).cpu()
            for _ in range(num_tasks)
        ]
    )


def _normalise_orders(orders: Orders, k: int) -> np.ndarray:
    """``(K, K)`` int array: row ``i`` lists the tasks visited for task ``i`` (``i`` included)."""
    if isinstance(orders, np.random.Generator):
        arr = _pcgrad_orders_np(k, orders)
    elif isinstance(orders, torch.Generator):
        arr = pcgrad_orders(k, orders).numpy()
    else:
        arr = host_array(orders, None)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError("orders must be integer task indices (a sequence or a (K, ·) array)")
    if arr.ndim == 1:
        arr = np.tile(arr, (k, 1))
    if arr.ndim != 2 or arr.shape[0] != k:
        raise ValueError(
            f"orders must be a generator, one order of the K={k} tasks, or one order per "
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


def _pcgrad_projections_np(
    m: np.ndarray, order: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pcgrad_projections` on a validated float64 host Gram matrix and normalised orders.

    Returns ``(C, projected)``. The conflict test of each pair ``(i, j)`` is relative to that
    pair only (see :func:`pcgrad_projections`), so it does not depend on the other tasks' norms,
    and its arithmetic is the same for any labelling of the tasks.
    """
    k = m.shape[0]
    diag = np.clip(np.diag(m), 0.0, None)
    norms = np.sqrt(diag)
    coef = np.eye(k)
    projected = np.zeros((k, k), dtype=bool)
    rounding = 4.0 * k * _EPS
    root_eps = math.sqrt(eps)
    for i in range(k):
        if diag[i] == 0.0:
            continue  # a zero g_i stays zero
        row = coef[i]
        dots = m[i].copy()  # dots[j] = g_i^PC . g_j, updated after every projection
        n2 = float(diag[i])  # |g_i^PC|^2, updated likewise
        size = float(norms[i])  # sum_k |C[i, k]| |g_k|: the scale of g_i^PC's round-off
        for j in order[i, 1:].tolist():
            d = float(dots[j])
            if not d < 0.0 or diag[j] == 0.0:
                continue
            # a conflict: cos^2(g_i^PC, g_j) > eps, and d above the round-off of its terms
            if -d <= max(root_eps * math.sqrt(n2), rounding * size) * float(norms[j]):
                continue
            step = -d / diag[j]
            row[j] += step
            dots += step * m[j]
            n2 = max(n2 - (d / float(norms[j])) ** 2, 0.0)
            size += abs(step) * float(norms[j])
            projected[i, j] = True
    return coef, projected


def pcgrad_projections(
    gram: Tensor | np.ndarray, orders: Orders, *, eps: float = DEFAULT_EPS
) -> tuple[Tensor, dict[str, Any]]:
    """PCGrad's projected gradients as a ``(K, K)`` matrix: ``g_i^PC = sum_k C[i, k] g_k``.

    For ``i = 0..K-1``: start from ``C[i] = e_i``; for ``j`` in ``orders[i]`` (``j != i``): if
    ``g_i^PC`` conflicts with ``g_j`` then ``C[i, j] -= d / M_jj`` with ``d = (C[i] M)_j``.

    Conflict test, relative to the pair only (scale-aware: a tiny gradient is projected against
    like any other, and the result does not depend on the other tasks' norms):
    ``d < 0``, ``d^2 > eps |g_i^PC|^2 M_jj`` (``cos^2(g_i^PC, g_j) > eps``) and
    ``-d > 4 K eps_64 (sum_k |C[i, k]| |g_k|) |g_j|`` (``d`` is above the round-off of the
    products it is made of; ``eps_64 = 2^-52``). A zero gradient (``M_jj = 0``) is never
    projected against and a zero ``g_i`` stays zero. ``|g_i^PC|^2`` is tracked as
    ``M_ii - sum d^2 / M_jj`` (exact in exact arithmetic; clipped at 0). Computed on the host
    (:func:`_pcgrad_projections_np`).

    Args:
        gram: ``(K, K)`` Gram matrix ``M_ij = g_i . g_j`` (a tensor on any device or an array).
        orders: a ``np.random.Generator`` or ``torch.Generator`` (orders drawn with
            :func:`pcgrad_orders`), one order of the tasks used for every ``i`` (e.g.
            ``[0, 1, 2]``), or one order per task (``K`` rows). Each row lists every other task
            once; task ``i`` itself may appear (skipped).
        eps: squared-cosine threshold of the conflict test (default ``1e-30``; ``0`` keeps only
            the round-off test).

    Returns:
        ``(C, info)``: ``C`` float64 ``(K, K)`` on ``gram``'s device; ``info`` has ``orders``
        (int64 ``(K, K)``, row ``i`` = the order used for task ``i``, starting with ``i``
        itself), ``projected`` (bool ``(K, K)``: ``g_i`` was projected against ``g_j``) and
        ``num_projections``.
    """
    m, device = host_gram(gram)
    eps = check_positive("eps", eps, allow_zero=True)
    order = _normalise_orders(orders, m.shape[0])
    coef, projected = _pcgrad_projections_np(m, order, eps)
    info: dict[str, Any] = {
        "orders": torch.from_numpy(order),
        "projected": torch.from_numpy(projected),
        "num_projections": int(projected.sum()),
    }
    return to_torch(coef, device), info


def pcgrad_coefficients(
    gram: Tensor | np.ndarray,
    orders: Orders,
    *,
    reduction: Reduction = "sum",
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """PCGrad coefficients: ``update = sum_i g_i^PC = sum_k c_k g_k`` with ``c = C^T 1``.

    ``reduction="mean"`` divides by ``K``. See :func:`pcgrad_projections` for ``orders``
    (a generator is advanced by one draw of ``K`` orders).

    Returns:
        float64 ``(K,)`` coefficients on ``gram``'s device.
    """
    reduction = check_choice("reduction", reduction, _REDUCTIONS)  # type: ignore[assignment]
    m, device = host_gram(gram)
    eps = check_positive("eps", eps, allow_zero=True)
    coef, _ = _pcgrad_projections_np(m, _normalise_orders(orders, m.shape[0]), eps)
    return to_torch(_reduce(coef, reduction), device)


def _reduce(coef: np.ndarray, reduction: str) -> np.ndarray:
    """``c = C^T 1`` (``"sum"``) or ``C^T 1 / K`` (``"mean"``)."""
    c: np.ndarray = coef.sum(0)
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

    The random orders come from a host ``numpy.random.Generator`` (PCG64) seeded with ``seed``:
    one independent permutation of the tasks per task and step (:func:`_pcgrad_orders_np`), so
    drawing them never touches the device. Its state is part of :meth:`state_dict`, so a
    save/load round trip continues with the same orders. Under ``torch.distributed`` use the
    same ``seed`` on every rank (the default) so the ranks agree.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        seed: seed of the order generator (default ``0``).
        reduction: ``"sum"`` (default) or ``"mean"``.
        eps: squared-cosine threshold of the conflict test: ``g_i^PC`` is projected against
            ``g_j`` when ``cos^2(g_i^PC, g_j) > eps`` (and the conflict is above round-off; see
            :func:`pcgrad_projections`). Default ``1e-30``.
        **kwargs: options of :class:`mtl.BalancedOptimizer`.

    ``BalanceInfo.weights`` are *coefficients* ``c`` with ``sum_i g_i^PC = sum_i c_i g_i`` (the
    projected update expanded over the original gradients; ``weights_kind = "coefficients"``):
    any sign, and large when gradients are nearly opposite.

    ``BalanceInfo.extras``: ``orders`` (``(K, K)``, row ``i`` = visiting order for task ``i``),
    ``projected`` (``(K, K)`` bool) and ``num_projections``.

    Cost: the per-task gradients and their Gram matrix (base class) plus ``O(K^3)`` scalar work.
    """

    weights_kind = "coefficients"

    accepts_seed = True

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
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        reduction = check_choice("reduction", reduction, _REDUCTIONS)  # type: ignore[assignment]
        eps = check_positive("eps", eps, allow_zero=True)
        super().__init__(optimizer, num_tasks, **kwargs)
        self.seed = seed
        self.reduction = reduction
        self.eps = eps
        self.generator = pcg64(seed)

    def _repr_options(self) -> str:
        return f"seed={self.seed}, reduction={self.reduction!r}, {super()._repr_options()}"

    def _balancer_state_dict(self) -> dict[str, Any]:
        # a plain dict of str and int (PCG64's 128-bit state and increment): torch.save-able
        return {"seed": self.seed, "generator": self.generator.bit_generator.state}

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        gen = state.get("generator") if isinstance(state, dict) else None
        if isinstance(gen, Tensor):
            # a checkpoint of the earlier torch.Generator version: continue deterministically
            # with a PCG64 seeded from that generator (the orders differ from what the torch
            # generator would have drawn)
            rng = rng_from_torch_state(gen, "PCGrad")
        elif gen is None:
            raise ValueError("PCGrad state_dict has no generator state")
        else:
            rng = rng_from_state(gen, "PCGrad")
        self.seed = int(state.get("seed", self.seed))
        self.generator = rng

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Orders from the host generator, then :func:`_pcgrad_projections_np` on the host Gram.

        Returns ``(c, {"orders", "projected", "num_projections"})``.
        """
        assert gram is not None  # requires_gram: the engine always passes the Gram matrix
        m = check_gram(gram)
        order = _normalise_orders(self.generator, m.shape[0])
        coef, projected = _pcgrad_projections_np(m, order, self.eps)
        extras = {"orders": order, "projected": projected, "num_projections": int(projected.sum())}
        return _reduce(coef, self.reduction), extras


#: kept for modules that imported it from here (MARIGOLD): see :func:`balancers._rng.rng_from_torch_state`
_rng_from_torch_state = rng_from_torch_state
