"""Task-conflict metrics: pure functions of the ``(K, K)`` float64 Gram matrix of the task
gradients (and of the coefficients of the applied update). Public through :mod:`mtl.conflict`,
whose docstring states the formulas and the conventions for degenerate inputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "aligned_condition_number",
    "condition_number",
    "conflict_rate",
    "cosine_matrix",
    "magnitude_similarity",
    "magnitude_similarity_summary",
    "pair_values",
    "summarize",
    "task_norms",
    "update_cosines",
    "update_norm",
]

_EPS64 = float(torch.finfo(torch.float64).eps)


# ---------------------------------------------------------------------- input handling
def as_gram(m: Any, *, allow_blocks: bool = False) -> Tensor:
    """``m`` as a detached, symmetrised float64 tensor of shape (K, K) (or (B, K, K))."""
    t = m.detach() if isinstance(m, Tensor) else torch.as_tensor(np.asarray(m))
    t = t.to(device="cpu", dtype=torch.float64)
    ok_dims = (2, 3) if allow_blocks else (2,)
    if t.dim() not in ok_dims or t.shape[-1] != t.shape[-2] or t.shape[-1] == 0:
        want = "(K, K) or (blocks, K, K)" if allow_blocks else "(K, K)"
        raise ValueError(f"expected a square Gram matrix of shape {want}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("the Gram matrix has non-finite entries")
    return 0.5 * (t + t.transpose(-1, -2))


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


# ---------------------------------------------------------------------- pure metrics
def task_norms(M: Tensor) -> Tensor:
    """Per-task gradient norms ``|g_i| = sqrt(M_ii)`` (float64, shape ``(K,)``).

    Args:
        M: ``(K, K)`` Gram matrix ``M_ij = <g_i, g_j>``.
    """
    m = as_gram(M)
    return m.diagonal().clamp(min=0.0).sqrt()


def cosine_matrix(M: Tensor, *, eps: float = 0.0) -> Tensor:
    """Pairwise cosine similarities ``cos_ij = M_ij / (|g_i| |g_j|)`` (float64, ``(K, K)``).

    Zero tasks (``|g_i| <= eps``, default: exactly zero) get cosine ``0`` with every task,
    themselves included; every other diagonal entry is exactly ``1``. Values are clipped to
    ``[-1, 1]`` (rounding). The function is idempotent: a cosine matrix is returned unchanged.

    Args:
        M: ``(K, K)`` Gram matrix.
        eps: norm at or below which a task counts as a zero task.
    """
    m = as_gram(M)
    eps = _check_eps(eps)
    n = m.diagonal().clamp(min=0.0).sqrt()
    nz = n > eps
    safe = torch.where(nz, n, torch.ones_like(n))
    c = (m / safe[:, None]) / safe[None, :]
    c = 0.5 * (c + c.T)  # exactly symmetric (the two divisions round differently)
    c = torch.where(nz[:, None] & nz[None, :], c, torch.zeros_like(c)).clamp(-1.0, 1.0)
    c.diagonal().copy_(nz.to(c.dtype))
    return c


def pair_values(matrix: Tensor) -> Tensor:
    """The strictly upper-triangular entries ``matrix[i, j]``, ``i < j``, in row-major order.

    For K tasks that is ``K (K - 1) / 2`` values: ``(0, 1), (0, 2), ..., (K-2, K-1)``.
    """
    t = matrix if isinstance(matrix, Tensor) else torch.as_tensor(np.asarray(matrix))
    k = t.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1)
    return t[..., i, j]


def conflict_rate(M: Tensor, *, tol: float = 0.0, eps: float = 0.0) -> float:
    """Share of task pairs ``i < j`` whose gradients conflict: ``cos_ij < -tol``.

    ``conflict_rate = #{i < j : cos_ij < -tol} / (K (K - 1) / 2)``, in ``[0, 1]``; ``nan`` for
    ``K = 1``. Pairs involving a zero task have cosine 0 and never conflict.

    Args:
        M: ``(K, K)`` Gram matrix.
        tol: margin below zero a cosine must pass to count (default 0: any negative cosine).
        eps: zero-task threshold, see :func:`cosine_matrix`.
    """
    vals = pair_values(cosine_matrix(M, eps=eps))
    if vals.numel() == 0:
        return math.nan
    return float((vals < -float(tol)).to(torch.float64).mean())


def magnitude_similarity(M: Tensor, *, eps: float = 0.0) -> Tensor:
    """Gradient-magnitude similarity of every pair (Yu et al. 2020, "Gradient Surgery").

    ``GMS_ij = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2)``, in ``[0, 1]``: 1 for equal magnitudes,
    ``2 s / (1 + s^2)`` when one gradient is ``s`` times the other, 0 when exactly one of the two
    is a zero task. Computed as ``2 r / (1 + r^2)`` with ``r = min/max`` of the two norms (no
    overflow). Two zero tasks have equal magnitudes: ``GMS = 1``; the diagonal is 1.

    Args:
        M: ``(K, K)`` Gram matrix.
        eps: norms ``<= eps`` are treated as exactly zero.

    Returns:
        float64 ``(K, K)`` matrix.
    """
    m = as_gram(M)
    eps = _check_eps(eps)
    n = m.diagonal().clamp(min=0.0).sqrt()
    n = torch.where(n > eps, n, torch.zeros_like(n))
    lo = torch.minimum(n[:, None], n[None, :])
    hi = torch.maximum(n[:, None], n[None, :])
    r = torch.where(hi > 0, lo / torch.where(hi > 0, hi, torch.ones_like(hi)), torch.ones_like(hi))
    return 2.0 * r / (1.0 + r * r)


def magnitude_similarity_summary(M: Tensor, *, eps: float = 0.0) -> dict[str, float]:
    """``{"min": ..., "mean": ...}`` of :func:`magnitude_similarity` over pairs ``i < j``.

    Both are ``nan`` for ``K = 1``.
    """
    vals = pair_values(magnitude_similarity(M, eps=eps))
    if vals.numel() == 0:
        return {"min": math.nan, "mean": math.nan}
    return {"min": float(vals.min()), "mean": float(vals.mean())}


def _default_rtol(k: int, rtol: float | None) -> float:
    if rtol is None:
        return k * _EPS64
    rtol = float(rtol)
    if not rtol >= 0.0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    return rtol


def condition_number(M: Tensor, *, rtol: float | None = None) -> float:
    """Condition number of the task-gradient matrix ``G`` (rows ``g_1 .. g_K``).

    ``kappa(G) = sigma_max(G) / sigma_min(G) = sqrt(lambda_max(M) / lambda_min(M))`` with the
    eigenvalues of ``M = G G^T``. It is ``1`` for orthogonal gradients of equal norm and grows
    with both magnitude imbalance and alignment/dependence (Aligned-MTL, Senushkin et al. 2023).

    Rank-deficient ``G`` (duplicate or dependent gradients, a zero gradient, ``K`` larger than
    the gradient dimension) gives ``inf``: precisely, ``inf`` when
    ``lambda_min <= rtol * lambda_max`` (or ``M = 0``), with ``rtol = K * eps_float64`` by
    default (NumPy's ``matrix_rank`` rule applied to ``M``). Gradients computed in float32 are
    dependent only up to float32 rounding, so copies of a float32 gradient give a large but
    finite value (around 1e7 or more): read anything above ~1e6 as numerically rank-deficient.

    Args:
        M: ``(K, K)`` Gram matrix.
        rtol: relative eigenvalue threshold for rank deficiency (see above).
    """
    m = as_gram(M)
    rtol = _default_rtol(m.shape[0], rtol)
    lam = torch.linalg.eigvalsh(m)
    lmax, lmin = float(lam[-1]), float(lam[0])
    if lmax <= 0.0 or lmin <= rtol * lmax:
        return math.inf
    return math.sqrt(lmax / lmin)


def aligned_condition_number(M: Tensor, *, rtol: float | None = None) -> float:
    """Condition number restricted to the rank of ``G``, as Aligned-MTL's balance transform uses.

    ``kappa_R(G) = sqrt(lambda_max(M) / lambda_R(M))`` where ``lambda_R`` is the smallest
    eigenvalue of ``M`` above ``tol = rtol * lambda_max`` (``rtol = K * eps_float64`` by default;
    the Aligned-MTL reference code uses ``K * eps`` of the default dtype, i.e.
    ``rtol = K * torch.finfo(torch.float32).eps``). Equal to :func:`condition_number` when ``G``
    has full rank, finite otherwise (dependent gradients are ignored instead of giving ``inf``);
    ``1`` for ``M = 0`` (no spread; Aligned-MTL falls back to the identity there).

    Args:
        M: ``(K, K)`` Gram matrix.
        rtol: relative eigenvalue threshold defining the numerical rank.
    """
    m = as_gram(M)
    rtol = _default_rtol(m.shape[0], rtol)
    lam = torch.linalg.eigvalsh(m)
    lmax = float(lam[-1])
    if lmax <= 0.0:
        return 1.0
    kept = lam[lam > rtol * lmax]
    return math.sqrt(lmax / float(kept.min()))


def _update_terms(M: Tensor, c: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(M c, task norms, |d|)`` for ``d = sum_k c_k g_k``, per block when M and c have blocks."""
    m = as_gram(M, allow_blocks=True)
    w = c.detach() if isinstance(c, Tensor) else torch.as_tensor(np.asarray(c))
    w = w.to(device="cpu", dtype=torch.float64)
    k = m.shape[-1]
    if w.dim() not in (1, 2) or w.shape[-1] != k:
        raise ValueError(
            f"coefficients must have shape ({k},) or (blocks, {k}), got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the coefficients have non-finite entries")
    if m.dim() == 2:
        if w.dim() == 2:
            if w.shape[0] != 1:
                raise ValueError(
                    f"per-block coefficients of shape {tuple(w.shape)} need the per-block Gram "
                    "matrices (blocks, K, K), e.g. BalanceInfo.block_grams"
                )
            w = w[0]
        m = m.unsqueeze(0)
    if w.dim() == 1:
        w = w.expand(m.shape[0], k)
    elif w.shape[0] != m.shape[0]:
        raise ValueError(
            f"{w.shape[0]} blocks of coefficients but {m.shape[0]} block Gram matrices"
        )
    mc = torch.einsum("bij,bj->i", m, w)
    dd = float(torch.einsum("bi,bi->", w, torch.einsum("bij,bj->bi", m, w)))
    norms = m.diagonal(dim1=-2, dim2=-1).sum(0).clamp(min=0.0).sqrt()
    return mc, norms, math.sqrt(max(dd, 0.0))


def update_norm(M: Tensor, c: Tensor) -> float:
    """Norm of the applied update ``|d| = sqrt(c^T M c)`` for ``d = sum_k c_k g_k``.

    With per-block Gram matrices ``M_b`` (shape ``(B, K, K)``) and per-block coefficients
    ``c_b`` (shape ``(B, K)``, or ``(K,)`` shared): ``|d|^2 = sum_b c_b^T M_b c_b``.
    """
    return _update_terms(M, c)[2]


def update_cosines(M: Tensor, c: Tensor, *, eps: float = 0.0) -> Tensor:
    """Cosine between the applied update ``d = sum_k c_k g_k`` and each task gradient.

    ``cos(d, g_i) = <d, g_i> / (|d| |g_i|) = (M c)_i / (|g_i| sqrt(c^T M c))``, from the Gram
    matrix and the coefficients only. A negative value means the step increases task ``i``'s
    loss to first order (plain gradient descent). ``0`` where ``|g_i| <= eps`` or
    ``|d| <= eps``; clipped to ``[-1, 1]``.

    With per-block Gram matrices ``M_b`` (``(B, K, K)``, e.g. ``BalanceInfo.block_grams``) and
    per-block coefficients ``c_b`` (``(B, K)``; a ``(K,)`` vector is shared by all blocks):
    ``<d, g_i> = sum_b (M_b c_b)_i``, ``|d|^2 = sum_b c_b^T M_b c_b``,
    ``|g_i|^2 = sum_b (M_b)_ii``.

    Args:
        M: ``(K, K)`` or ``(B, K, K)`` Gram matrices.
        c: ``(K,)`` or ``(B, K)`` coefficients (``BalanceInfo.weights``).
        eps: norm threshold below which the cosine is reported as 0.

    Returns:
        float64 ``(K,)``.
    """
    eps = _check_eps(eps)
    mc, norms, dn = _update_terms(M, c)
    if dn <= eps:
        return torch.zeros_like(mc)
    ok = norms > eps
    safe = torch.where(ok, norms, torch.ones_like(norms))
    cos = (mc / safe) / dn
    return torch.where(ok, cos, torch.zeros_like(cos)).clamp(-1.0, 1.0)


def _nan_stats(vals: Tensor) -> tuple[float, float]:
    if vals.numel() == 0:
        return math.nan, math.nan
    return float(vals.min()), float(vals.mean())


def summarize(
    M: Tensor, c: Tensor | None = None, *, eps: float = 0.0, conflict_tol: float = 0.0
) -> dict[str, Any]:
    """All the metrics of ``M`` (and of the update with coefficients ``c``) as plain Python values.

    Args:
        M: ``(K, K)`` Gram matrix, or ``(B, K, K)`` per-block Gram matrices (pairwise metrics use
            their sum; the update metrics use the blocks).
        c: optional coefficients ``(K,)`` or ``(B, K)`` of the applied update.
        eps: zero-task threshold.
        conflict_tol: a pair conflicts when ``cos_ij < -conflict_tol`` (``conflict_rate`` and
            ``num_conflicting_pairs``; default 0: any negative cosine).

    Returns:
        a dict with ``num_tasks`` (int); ``norms`` (list of K floats); ``cosine`` and
        ``magnitude_similarity`` (K lists of K floats); ``conflict_rate``,
        ``num_conflicting_pairs``, ``min_cosine``, ``mean_cosine``,
        ``magnitude_similarity_min``, ``magnitude_similarity_mean`` (over pairs ``i < j``; nan
        for K = 1), ``condition_number`` (may be inf), ``condition_number_aligned``; and with
        ``c``: ``update_cosines`` (list of K floats), ``min_update_cosine``, ``update_norm``.
    """
    blocks = as_gram(M, allow_blocks=True)
    m = blocks if blocks.dim() == 2 else blocks.sum(0)
    cos = cosine_matrix(m, eps=eps)
    pairs = pair_values(cos)
    gms = magnitude_similarity(m, eps=eps)
    gms_min, gms_mean = _nan_stats(pair_values(gms))
    cmin, cmean = _nan_stats(pairs)
    out: dict[str, Any] = {
        "num_tasks": int(m.shape[0]),
        "norms": task_norms(m).tolist(),
        "cosine": cos.tolist(),
        "conflict_rate": conflict_rate(m, tol=conflict_tol, eps=eps),
        "num_conflicting_pairs": int((pairs < -float(conflict_tol)).sum()),
        "min_cosine": cmin,
        "mean_cosine": cmean,
        "magnitude_similarity": gms.tolist(),
        "magnitude_similarity_min": gms_min,
        "magnitude_similarity_mean": gms_mean,
        "condition_number": condition_number(m),
        "condition_number_aligned": aligned_condition_number(m),
    }
    if c is not None:
        uc = update_cosines(blocks, c, eps=eps)
        out["update_cosines"] = uc.tolist()
        out["min_update_cosine"] = float(uc.min())
        out["update_norm"] = update_norm(blocks, c)
    return out
