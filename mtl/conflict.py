"""Task-conflict diagnostics: pure functions of the Gram matrix, and a streaming tracker.

Every metric here is a function of the ``(K, K)`` float64 Gram matrix ``M_ij = <g_i, g_j>`` of
the task gradients ``g_1 .. g_K`` (at the balance point, or at the shared parameters) and,
for the update cosines, of the coefficients ``c`` of the applied update ``d = sum_k c_k g_k``.
A balanced backward pass already computes ``M`` (:attr:`mtl.BalanceInfo.gram`), so the
diagnostics cost no extra backward pass::

    |g_i|        = sqrt(M_ii)
    cos_ij       = M_ij / (|g_i| |g_j|)
    conflict     = share of pairs i < j with cos_ij < 0
    GMS_ij       = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2)           (Yu et al. 2020)
    kappa(G)     = sqrt(lambda_max(M) / lambda_min(M))            (G: the K task gradients)
    cos(d, g_i)  = (M c)_i / (|g_i| sqrt(c^T M c))

Conventions for degenerate inputs (documented once, used everywhere):

* a task whose gradient norm is ``<= eps`` (default ``0``: exactly zero) is a *zero task*: its
  cosine with every task, itself included, is ``0``; it never counts as a conflict;
* statistics over task pairs (conflict rate, min/mean cosine, min/mean magnitude similarity)
  are ``nan`` when ``K = 1`` (there is no pair);
* the condition number is ``inf`` when ``M`` is numerically rank-deficient (duplicate or
  linearly dependent gradients, a zero gradient); :func:`aligned_condition_number` stays finite.

:class:`ConflictTracker` records these metrics every ``every`` steps from the
:class:`~mtl.BalanceInfo` of the step, optionally with a (costly) parameter-level probe, and
saves its history as JSON or CSV. See ``docs/diagnostics.md``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._gram import gram_matrix
from ._info import BalanceInfo

__all__ = [
    "ConflictTracker",
    "aligned_condition_number",
    "condition_number",
    "conflict_rate",
    "cosine_matrix",
    "magnitude_similarity",
    "magnitude_similarity_summary",
    "pair_values",
    "record_columns",
    "summarize",
    "task_norms",
    "update_cosines",
    "update_norm",
]

_EPS64 = float(torch.finfo(torch.float64).eps)


# ---------------------------------------------------------------------- input handling
def _as_gram(m: Any, *, allow_blocks: bool = False) -> Tensor:
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
    m = _as_gram(M)
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
    m = _as_gram(M)
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
    m = _as_gram(M)
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
    m = _as_gram(M)
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
    m = _as_gram(M)
    rtol = _default_rtol(m.shape[0], rtol)
    lam = torch.linalg.eigvalsh(m)
    lmax = float(lam[-1])
    if lmax <= 0.0:
        return 1.0
    kept = lam[lam > rtol * lmax]
    return math.sqrt(lmax / float(kept.min()))


def _update_terms(M: Tensor, c: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(M c, task norms, |d|)`` for ``d = sum_k c_k g_k``, per block when M and c have blocks."""
    m = _as_gram(M, allow_blocks=True)
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
    blocks = _as_gram(M, allow_blocks=True)
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


# ---------------------------------------------------------------------- the tracker
_STR_KEYS = ("source", "level", "status")
_GRAM_KEYS = (
    "conflict_rate",
    "min_cosine",
    "mean_cosine",
    "magnitude_similarity_min",
    "magnitude_similarity_mean",
    "condition_number",
    "condition_number_aligned",
)
_SCALAR_KEYS = (*_GRAM_KEYS, "update_norm", "min_update_cosine")
_FORMAT = "mtl.ConflictTracker"
_VERSION = 1

Source = Literal["balance", "probe"]


def _pair_key(a: str, b: str) -> str:
    return f"cos[{a},{b}]"


def record_columns(task_names: Sequence[str]) -> list[str]:
    """The keys of every tracker record, in order, for the given task names."""
    names = list(task_names)
    cols = ["step", "source", "level", "status", *_SCALAR_KEYS]
    for prefix in ("loss", "norm", "weight", "update_cos"):
        cols.extend(f"{prefix}[{n}]" for n in names)
    cols.extend(
        _pair_key(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
    )
    return cols


class ConflictTracker:
    """Record task-conflict metrics during training, from the Gram matrix the balancer computed.

    Call :meth:`update` after every balanced backward pass; on sampled steps
    (``step % every == 0``) it reads ``info.gram`` and ``info.weights`` and appends one flat
    record to :attr:`history` (no extra backward pass: the overhead is a K x K eigenvalue
    problem). Methods that do not need the Gram matrix (``EqualWeight``, ``MARIGOLD``) leave
    ``info.gram`` at ``None``: build them with ``compute_gram=True`` to get diagnostics. A sampled
    step without a Gram matrix is recorded with ``status="no_gram"`` and NaN metrics, counted in
    :attr:`num_no_gram`, and warned about once; a step the optimizer skipped because of a
    non-finite loss or gradient (``info.skipped``) is recorded with ``status="skipped"``.

    Optionally, :meth:`update_parameter_level` computes the Gram matrix of the task gradients
    at the shared *parameters* (K extra ``autograd.grad`` calls: as expensive as parameter-level
    balancing) to compare representation-level with parameter-level conflict; its records have
    ``source="probe"`` and ``level="parameters"``.

    Record keys (see :func:`record_columns`): ``step``, ``source`` (``"balance"`` or
    ``"probe"``), ``level`` (``"representation"``/``"parameters"``), ``status`` (``"ok"``,
    ``"no_gram"``, ``"skipped"``), ``conflict_rate``, ``min_cosine``, ``mean_cosine``,
    ``magnitude_similarity_min``, ``magnitude_similarity_mean``, ``condition_number``,
    ``condition_number_aligned``, ``update_norm``, ``min_update_cosine``, and per task
    ``loss[name]``, ``norm[name]``, ``weight[name]``, ``update_cos[name]`` and per pair
    ``cos[a,b]``. Missing values are NaN. For per-block weights (``(blocks, K)``),
    ``weight[name]`` is the mean over blocks and the update cosines use ``info.block_grams``.

    Args:
        every: sample every ``every`` steps (``step % every == 0``); default 10.
        param_level_every: schedule of :meth:`update_parameter_level` (``step %
            param_level_every == 0``); ``None`` (default) = the same schedule as ``every``.
        task_names: names used in the record keys (default ``task0``, ``task1``, ...; K is then
            taken from the first update).
        conflict_tol: a pair counts in ``conflict_rate`` when ``cos_ij < -conflict_tol``
            (default 0). Nearly orthogonal tasks (``|cos| ~ 0.01``) flip sign from batch to
            batch; a tolerance such as 0.05 keeps that noise out of the rate (the cosines
            themselves are recorded unchanged).
    """

    def __init__(
        self,
        every: int = 10,
        param_level_every: int | None = None,
        task_names: Sequence[str] | None = None,
        conflict_tol: float = 0.0,
    ) -> None:
        self.every = _check_every(every, "every")
        if isinstance(conflict_tol, bool) or not isinstance(conflict_tol, (int, float)):
            raise TypeError(f"conflict_tol must be a number, got {conflict_tol!r}")
        if not 0.0 <= float(conflict_tol) < 1.0:
            raise ValueError(f"conflict_tol must be in [0, 1), got {conflict_tol!r}")
        self.conflict_tol = float(conflict_tol)
        self.param_level_every = (
            None
            if param_level_every is None
            else _check_every(param_level_every, "param_level_every")
        )
        self.task_names: list[str] | None = None
        if task_names is not None:
            self.task_names = _check_names(task_names)
        self.history: list[dict[str, Any]] = []
        self.num_sampled = 0  # sampled balance steps (records with source "balance")
        self.num_no_gram = 0  # ... of which had no Gram matrix
        self.num_skipped = 0  # ... of which the optimizer skipped (non-finite)
        self.num_probes = 0  # parameter-level probes
        self._warned_no_gram = False
        self._pending: tuple[int, Tensor, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ schedule
    def is_sampled(self, step: int) -> bool:
        """Whether :meth:`update` records ``step``."""
        return int(step) % self.every == 0

    def is_probe_step(self, step: int) -> bool:
        """Whether :meth:`update_parameter_level` computes anything at ``step``."""
        every = self.every if self.param_level_every is None else self.param_level_every
        return int(step) % every == 0

    # ------------------------------------------------------------------ recording
    def _names(self, k: int) -> list[str]:
        if self.task_names is None:
            self.task_names = [f"task{i}" for i in range(k)]
        if len(self.task_names) != k:
            raise ValueError(
                f"got {k} tasks but the tracker has {len(self.task_names)} task names "
                f"{self.task_names}"
            )
        return self.task_names

    def _blank(self, step: int, source: Source, level: str, status: str, k: int) -> dict[str, Any]:
        rec: dict[str, Any] = dict.fromkeys(record_columns(self._names(k)), math.nan)
        rec.update(step=int(step), source=source, level=str(level), status=status)
        return rec

    def _fill(self, rec: dict[str, Any], m: Tensor) -> None:
        names = self.task_names
        assert names is not None
        s = summarize(m, conflict_tol=self.conflict_tol)
        for key in _GRAM_KEYS:
            rec[key] = s[key]
        for i, n in enumerate(names):
            rec[f"norm[{n}]"] = s["norms"][i]
        cos = s["cosine"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                rec[_pair_key(names[i], names[j])] = cos[i][j]

    def _fill_update(self, rec: dict[str, Any], grams: Tensor, weights: Tensor) -> None:
        names = self.task_names
        assert names is not None
        uc = update_cosines(grams, weights)
        for i, n in enumerate(names):
            rec[f"update_cos[{n}]"] = float(uc[i])
        rec["min_update_cosine"] = float(uc.min())
        rec["update_norm"] = update_norm(grams, weights)

    @staticmethod
    def _set_vector(rec: dict[str, Any], prefix: str, names: list[str], values: Tensor) -> None:
        v = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).tolist()
        for n, x in zip(names, v):
            rec[f"{prefix}[{n}]"] = x

    def update(self, step: int, info: BalanceInfo) -> dict[str, Any] | None:
        """Record the metrics of ``info`` if ``step`` is sampled; return the record or ``None``.

        Reads ``info.gram`` (``(K, K)``), ``info.weights`` (``(K,)`` or ``(blocks, K)``),
        ``info.block_grams``, ``info.losses``, ``info.level`` and ``info.skipped``; never runs a
        backward pass. If a parameter-level probe of the same step is waiting for the weights
        (see :meth:`update_parameter_level`), its update cosines are completed with
        ``info.weights`` (``(K,)`` weights only).
        """
        step = int(step)
        k = int(info.losses.shape[0])
        names = self._names(k)
        weights = info.weights.detach().to(device="cpu", dtype=torch.float64)
        if self._pending is not None:
            p_step, p_gram, p_rec = self._pending
            if p_step == step and not info.skipped and weights.dim() == 1:
                self._set_vector(p_rec, "weight", names, weights)
                self._fill_update(p_rec, p_gram, weights)
            if p_step <= step:
                self._pending = None
        if not self.is_sampled(step):
            return None
        self.num_sampled += 1
        gram = info.gram
        if info.skipped:
            status = "skipped"
            self.num_skipped += 1
        elif gram is None:
            status = "no_gram"
            self.num_no_gram += 1
            if not self._warned_no_gram:
                self._warned_no_gram = True
                warnings.warn(
                    f"ConflictTracker: BalanceInfo.gram is None at step {step}; the metrics of "
                    "sampled steps are recorded as NaN. Methods that do not need the Gram matrix "
                    "(EqualWeight, MARIGOLD) compute it for diagnostics when built with "
                    "compute_gram=True.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            status = "ok"
        rec = self._blank(step, "balance", info.level, status, k)
        self._set_vector(rec, "loss", names, info.losses)
        if not info.skipped:
            w_mean = weights if weights.dim() == 1 else weights.mean(0)
            self._set_vector(rec, "weight", names, w_mean)
        if status == "ok":
            assert gram is not None
            m = _as_gram(gram)
            self._fill(rec, m)
            if weights.dim() == 1 or weights.shape[0] == 1:
                self._fill_update(rec, m, weights)
            elif info.block_grams is not None and info.block_grams.shape[0] == weights.shape[0]:
                self._fill_update(rec, _as_gram(info.block_grams, allow_blocks=True), weights)
        self.history.append(rec)
        return rec

    def update_parameter_level(
        self,
        step: int,
        losses: Sequence[Tensor] | Tensor,
        shared_parameters: Iterable[Tensor],
        weights: Tensor | Sequence[float] | None = None,
    ) -> dict[str, Any] | None:
        """Probe conflict at the shared parameters on sampled steps (expensive).

        Computes ``g_k = dL_k / d theta_shared`` with K ``torch.autograd.grad(L_k, params,
        retain_graph=True)`` calls (``.grad`` is not touched), accumulates the float64 Gram
        matrix parameter by parameter, and records it with ``source="probe"``. The cost is that
        of parameter-level balancing (K backward passes through the trunk), so sample sparsely
        (``param_level_every``). Call it after the forward pass and *before*
        ``opt.backward(...)``, which frees the graph.

        The coefficients of the step are not known yet at that point: pass ``weights`` to
        compute the update cosines now, or leave it ``None`` and the following :meth:`update`
        of the same step fills them in from ``info.weights``. With representation-level weights
        ``c`` the shared parameters receive ``grad sum_k c_k L_k = sum_k c_k g_k``, so these are
        the cosines between the actual parameter update (before the inner optimizer) and each
        task's parameter gradient.

        Returns:
            the record, or ``None`` when ``step`` is not a probe step.
        """
        step = int(step)
        if not self.is_probe_step(step):
            return None
        if isinstance(losses, Tensor):
            if losses.dim() != 1:
                raise ValueError(f"losses must be 1-D of length K, got shape {tuple(losses.shape)}")
            items = list(losses.unbind(0))
        else:
            items = list(losses)
        if not items:
            raise ValueError("losses is empty")
        if isinstance(shared_parameters, Tensor):
            raise TypeError("shared_parameters must be an iterable of tensors (wrap it in a list)")
        params = [p for p in shared_parameters if p.requires_grad]
        if not params:
            raise ValueError("shared_parameters has no tensor that requires grad")
        k = len(items)
        names = self._names(k)
        grads = []
        for i, loss in enumerate(items):
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"loss {i} must be a scalar tensor")
            gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads.append(gs)
        m = torch.zeros(k, k, dtype=torch.float64)
        for j, p in enumerate(params):
            rows = []
            for i in range(k):
                g = grads[i][j]
                if g is None:
                    g = torch.zeros_like(p)
                elif g.is_sparse:
                    g = g.to_dense()
                rows.append(g.reshape(-1))
            m += gram_matrix(torch.stack(rows)).cpu()
        del grads
        self.num_probes += 1
        values = torch.stack([t.detach().reshape(()) for t in items])
        finite = bool(torch.isfinite(m).all())
        rec = self._blank(step, "probe", "parameters", "ok" if finite else "skipped", k)
        self._set_vector(rec, "loss", names, values)
        if finite:
            m = _as_gram(m)
            self._fill(rec, m)
            if weights is not None:
                w = torch.as_tensor(
                    weights.detach().cpu() if isinstance(weights, Tensor) else weights,
                    dtype=torch.float64,
                )
                self._set_vector(rec, "weight", names, w if w.dim() == 1 else w.mean(0))
                self._fill_update(rec, m, w)
            else:
                self._pending = (step, m, rec)
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ reading
    def records(self, source: Source | None = "balance") -> list[dict[str, Any]]:
        """The records of one source (``"balance"``, ``"probe"``), or all with ``None``."""
        if source is None:
            return list(self.history)
        return [r for r in self.history if r["source"] == source]

    def series(self, key: str, source: Source = "balance") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` arrays of one record key (e.g. ``"conflict_rate"``)."""
        recs = self.records(source)
        steps = np.array([r["step"] for r in recs], dtype=np.int64)
        vals = np.array([r.get(key, math.nan) for r in recs], dtype=np.float64)
        return steps, vals

    def summary(self) -> dict[str, Any]:
        """Aggregates over the history (NaN-aware means; ``nan`` where nothing was recorded).

        Keys: ``num_sampled``, ``num_ok``, ``num_no_gram``, ``num_skipped``,
        ``mean_conflict_rate``, ``frac_steps_with_conflict`` (share of recorded steps with at
        least one conflicting pair), ``mean_min_cosine``, ``mean_cosine``,
        ``mean_magnitude_similarity_min``, ``mean_magnitude_similarity_mean``,
        ``median_condition_number``, ``frac_rank_deficient`` (condition number inf),
        ``median_condition_number_aligned``, ``mean_min_update_cosine``,
        ``frac_steps_with_negative_update_cosine`` (the update increased some task's loss to
        first order), and per task ``mean_norm[name]``, ``mean_weight[name]``,
        ``mean_update_cos[name]``, per pair ``mean_cos[a,b]`` and ``frac_conflict[a,b]``.
        When parameter-level probes exist, the same statistics of the probes are under
        ``"parameter_level"`` (with ``num_probes``).
        """
        out = _summarize_records(self.records("balance"), self.task_names or [])
        out["num_no_gram"] = self.num_no_gram
        out["num_skipped"] = self.num_skipped
        probes = self.records("probe")
        if probes:
            p = _summarize_records(probes, self.task_names or [])
            p["num_probes"] = p.pop("num_sampled")
            out["parameter_level"] = p
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, task names, counters and the history."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "every": self.every,
            "param_level_every": self.param_level_every,
            "conflict_tol": self.conflict_tol,
            "task_names": None if self.task_names is None else list(self.task_names),
            "num_sampled": self.num_sampled,
            "num_no_gram": self.num_no_gram,
            "num_skipped": self.num_skipped,
            "num_probes": self.num_probes,
            "warned_no_gram": self._warned_no_gram,
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (history, counters, task names).

        The schedule (``every``, ``param_level_every``) stays the one this tracker was built
        with. Raises ``ValueError`` when the saved task names differ from this tracker's.
        """
        if state.get("format") != _FORMAT:
            raise ValueError(f"not a ConflictTracker state (format={state.get('format')!r})")
        saved = state.get("task_names")
        if saved is not None:
            saved = _check_names(saved)
            if self.task_names is not None and self.task_names != saved:
                raise ValueError(
                    f"saved task names {saved} differ from this tracker's {self.task_names}"
                )
            self.task_names = saved
        self.history = [dict(r) for r in state.get("history", [])]
        self.num_sampled = int(state.get("num_sampled", 0))
        self.num_no_gram = int(state.get("num_no_gram", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
        self.num_probes = int(state.get("num_probes", 0))
        self._warned_no_gram = bool(state.get("warned_no_gram", False))
        self._pending = None

    def to_json(self, path: str | PathLike[str]) -> None:
        """Write :meth:`state_dict` as strict JSON (NaN as ``null``, infinities as strings)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_encode(self.state_dict()), f, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, path: str | PathLike[str]) -> ConflictTracker:
        """A tracker restored from :meth:`to_json` output (same schedule, names and history)."""
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a ConflictTracker JSON file")
        state["history"] = [_decode_record(r) for r in state.get("history", [])]
        tracker = cls(
            every=state["every"],
            param_level_every=state.get("param_level_every"),
            task_names=state.get("task_names"),
        )
        tracker.load_state_dict(state)
        return tracker

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write the history as a CSV table, one row per record (:func:`record_columns`)."""
        cols = record_columns(self.task_names or [])
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(cols)
            for r in self.history:
                writer.writerow([_csv_cell(r.get(c, math.nan)) for c in cols])

    @classmethod
    def from_csv(
        cls, path: str | PathLike[str], every: int = 10, param_level_every: int | None = None
    ) -> ConflictTracker:
        """A tracker whose history is read from :meth:`to_csv` output.

        Task names are recovered from the ``norm[...]`` columns; the counters are recomputed
        from the records; the schedule is not stored in the CSV (pass it).
        """
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = list(reader)
        names = [c[5:-1] for c in header if c.startswith("norm[") and c.endswith("]")]
        tracker = cls(every=every, param_level_every=param_level_every, task_names=names or None)
        for row in rows:
            rec: dict[str, Any] = {}
            for col, cell in zip(header, row):
                if col in _STR_KEYS:
                    rec[col] = cell
                elif col == "step":
                    rec[col] = int(cell)
                else:
                    rec[col] = float(cell) if cell != "" else math.nan
            tracker.history.append(rec)
        balance = tracker.records("balance")
        tracker.num_sampled = len(balance)
        tracker.num_no_gram = sum(r["status"] == "no_gram" for r in balance)
        tracker.num_skipped = sum(r["status"] == "skipped" for r in balance)
        tracker.num_probes = len(tracker.records("probe"))
        return tracker

    def __len__(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        return (
            f"ConflictTracker(every={self.every}, param_level_every={self.param_level_every}, "
            f"task_names={self.task_names}, records={len(self.history)})"
        )


# ---------------------------------------------------------------------- tracker helpers
def _check_every(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("task_names must be a sequence of strings, not a single string")
    out = [str(n) for n in names]
    if not out:
        raise ValueError("task_names is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"task_names must be unique, got {out}")
    return out


def _nanmean(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _nanmedian(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else math.nan


def _frac(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def _summarize_records(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]

    def col(key: str, rs: list[dict[str, Any]] = ok) -> list[float]:
        return [float(r.get(key, math.nan)) for r in rs]

    cond = col("condition_number")
    min_uc = [x for x in col("min_update_cosine") if not math.isnan(x)]
    out: dict[str, Any] = {
        "num_sampled": len(records),
        "num_ok": len(ok),
        "mean_conflict_rate": _nanmean(col("conflict_rate")),
        "frac_steps_with_conflict": _frac(
            [x > 0 for x in col("conflict_rate") if not math.isnan(x)]
        ),
        "mean_min_cosine": _nanmean(col("min_cosine")),
        "mean_cosine": _nanmean(col("mean_cosine")),
        "mean_magnitude_similarity_min": _nanmean(col("magnitude_similarity_min")),
        "mean_magnitude_similarity_mean": _nanmean(col("magnitude_similarity_mean")),
        "median_condition_number": _nanmedian(cond),
        "frac_rank_deficient": _frac([math.isinf(x) for x in cond if not math.isnan(x)]),
        "median_condition_number_aligned": _nanmedian(col("condition_number_aligned")),
        "mean_min_update_cosine": _nanmean(min_uc),
        "frac_steps_with_negative_update_cosine": _frac([x < 0 for x in min_uc]),
    }
    for n in names:
        out[f"mean_norm[{n}]"] = _nanmean(col(f"norm[{n}]"))
    for n in names:
        out[f"mean_weight[{n}]"] = _nanmean(col(f"weight[{n}]", records))
    for n in names:
        out[f"mean_update_cos[{n}]"] = _nanmean(col(f"update_cos[{n}]"))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            key = _pair_key(names[i], names[j])
            vals = col(key)
            out[f"mean_{key}"] = _nanmean(vals)
            out[f"frac_conflict[{names[i]},{names[j]}]"] = _frac(
                [x < 0 for x in vals if not math.isnan(x)]
            )
    return out


def _encode_float(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _encode(obj: Any) -> Any:
    if isinstance(obj, float):
        return _encode_float(obj)
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in rec.items():
        if key in _STR_KEYS:
            out[key] = v
        elif key == "step":
            out[key] = int(v)
        elif v is None:
            out[key] = math.nan
        else:
            out[key] = float(v)  # float("Infinity") == inf
    return out


def _csv_cell(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip repr; 'nan', 'inf'
    return str(v)
