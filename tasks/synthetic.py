"""Synthetic multi-task regression with a task-correlation dial (MMoE paper, section 4.1).

Recipe (Ma et al., KDD 2018), generalized from 2 to K tasks:

1. draw orthonormal ``u_1..u_K`` in R^d (QR of a d x K standard Gaussian matrix);
2. ``w_k = c * sum_j A_kj u_j`` where ``A`` is the Cholesky factor of the K x K correlation
   matrix ``P`` (``A A^T = P``; a semidefinite Cholesky, so ``P`` may be singular, e.g. p = 1),
   hence ``cos(w_i, w_j) = P_ij``; for K = 2 and scalar p this is exactly
   ``w_1 = c u_1, w_2 = c (p u_1 + sqrt(1 - p^2) u_2)``;
3. draw ``alpha_1..alpha_m, beta_1..beta_m ~ N(0, 1)`` once (shared by all tasks);
4. ``x ~ N(0, I_d)``; ``y_k = w_k^T x + sum_i sin(alpha_i w_k^T x + beta_i) + eps_k`` with
   ``eps_k ~ N(0, noise^2)``; optionally ``y_k *= loss_scales[k]`` (a per-task loss-scale knob:
   the squared-error loss of task k scales by ``loss_scales[k]**2``).

All tasks are regression tasks; inputs are the d numeric features (no categorical column).
Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed fixes the data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ._data import DataSplits, FeatureSchema, TabularDataset, TaskSpec, label_correlation

__all__ = ["make_synthetic", "correlation_matrix", "psd_cholesky"]


def correlation_matrix(
    correlation: float | Sequence[Sequence[float]] | np.ndarray, num_tasks: int
) -> np.ndarray:
    """The K x K task-correlation matrix from a scalar p (all pairs) or a full matrix.

    Raises:
        ValueError: wrong shape, not symmetric, diagonal not 1, entries outside [-1, 1], or not
            positive semidefinite (e.g. a scalar p < -1/(K-1)).
    """
    k = int(num_tasks)
    if k < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    arr = np.asarray(correlation, dtype=np.float64)
    if arr.ndim == 0:
        p = float(arr)
        if not -1.0 <= p <= 1.0:
            raise ValueError(f"correlation must lie in [-1, 1], got {p}")
        mat = np.full((k, k), p)
        np.fill_diagonal(mat, 1.0)
    else:
        if arr.shape != (k, k):
            raise ValueError(f"correlation matrix must have shape ({k}, {k}), got {arr.shape}")
        mat = arr.copy()
        if not np.allclose(mat, mat.T, atol=1e-10):
            raise ValueError("correlation matrix must be symmetric")
        if not np.allclose(np.diag(mat), 1.0, atol=1e-10):
            raise ValueError("correlation matrix must have a unit diagonal")
        if np.abs(mat).max() > 1.0 + 1e-10:
            raise ValueError("correlation matrix entries must lie in [-1, 1]")
    eig = np.linalg.eigvalsh(mat)
    if eig.min() < -1e-8:
        raise ValueError(
            f"correlation matrix is not positive semidefinite (smallest eigenvalue {eig.min():.3g}); "
            f"a scalar p for K tasks needs p >= -1/(K-1)"
        )
    return mat


def psd_cholesky(mat: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Lower-triangular ``A`` with ``A A^T = mat`` for a positive SEMIdefinite ``mat``.

    The ordinary Cholesky recursion, with a column set to zero where the pivot vanishes
    (so singular matrices such as the all-ones correlation work).
    """
    mat = np.asarray(mat, dtype=np.float64)
    k = mat.shape[0]
    a = np.zeros_like(mat)
    for j in range(k):
        d = mat[j, j] - a[j, :j] @ a[j, :j]
        if d <= tol:
            continue
        a[j, j] = np.sqrt(d)
        for i in range(j + 1, k):
            a[i, j] = (mat[i, j] - a[i, :j] @ a[j, :j]) / a[j, j]
    return a


class _Drawn(NamedTuple):
    """One draw of the benchmark: task weights ``w`` (K, d), the shared sinusoid parameters,
    the inputs ``x`` (n, d) and the scaled targets ``y`` (n, K), all float64."""

    w: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    x: np.ndarray
    y: np.ndarray


def _checked_loss_scales(
    k: int,
    dim: int,
    num_samples: int,
    n_valid: int,
    n_test: int,
    num_sin: int,
    noise: float,
    loss_scales: Sequence[float] | None,
) -> np.ndarray:
    """Check the sizes and knobs of :func:`make_synthetic`; the per-task target multipliers
    (ones when ``loss_scales`` is ``None``)."""
    if dim < k:
        raise ValueError(f"dim ({dim}) must be >= num_tasks ({k}) for orthonormal task directions")
    for name, v in (("num_samples", num_samples), ("n_valid", n_valid), ("n_test", n_test)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_sin < 0 or noise < 0:
        raise ValueError("num_sin and noise must be non-negative")
    if loss_scales is None:
        return np.ones(k)
    scales = np.asarray(list(loss_scales), dtype=np.float64)
    if scales.shape != (k,):
        raise ValueError(f"loss_scales must have {k} entries (one per task), got {len(scales)}")
    return scales


def _draw(
    rng: np.random.Generator,
    mat: np.ndarray,
    n: int,
    dim: int,
    num_sin: int,
    scale: float,
    noise: float,
    scales: np.ndarray,
) -> _Drawn:
    """Steps 1-4 of the recipe (module docstring) for ``n`` rows, in this order of draws from
    ``rng``: the task directions, alpha, beta, the inputs, the noise."""
    k = mat.shape[0]
    q, _ = np.linalg.qr(rng.standard_normal((dim, k)))  # (d, K) orthonormal columns
    a = psd_cholesky(mat)
    w = scale * (a @ q.T)  # (K, d); row k = c * sum_j A_kj u_j
    alpha = rng.standard_normal(num_sin)
    beta = rng.standard_normal(num_sin)
    x = rng.standard_normal((n, dim))
    z = x @ w.T  # (n, K)
    y = z.copy()
    for ai, bi in zip(alpha, beta):
        y += np.sin(ai * z + bi)
    y += noise * rng.standard_normal((n, k))
    y *= scales
    return _Drawn(w, alpha, beta, x, y)


def _info(
    correlation: float | Sequence[Sequence[float]] | np.ndarray,
    mat: np.ndarray,
    drawn: _Drawn,
    n_train: int,
    options: dict[str, Any],
    scales: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """The ``info`` of :func:`make_synthetic`: the requested and measured correlations, the
    generation ``options`` (dim, num_sin, scale, noise), the weights and the sinusoid
    parameters; label correlations are measured on the first ``n_train`` rows (the train
    split) and on all rows."""
    w, y = drawn.w, drawn.y
    k = mat.shape[0]
    norms = np.linalg.norm(w, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (w @ w.T) / np.outer(norms, norms)
    corr_train = label_correlation(y[:n_train])
    requested = float(np.asarray(correlation)) if np.ndim(correlation) == 0 else mat.tolist()
    info: dict[str, Any] = {
        "dataset": "synthetic-mmoe",
        "num_tasks": k,
        "correlation": requested,
        "correlation_matrix": mat.tolist(),
        "weight_cosine": cos.tolist(),
        "label_correlation": corr_train.tolist(),
        "label_correlation_all": label_correlation(y).tolist(),
        **options,
        "loss_scales": scales.tolist(),
        "seed": seed,
        "weights": w,
        "alpha": drawn.alpha,
        "beta": drawn.beta,
    }
    if k == 2:
        info["p"] = float(mat[0, 1])
        info["measured_label_correlation"] = float(corr_train[0, 1])
    return info


def make_synthetic(
    num_tasks: int = 2,
    correlation: float | Sequence[Sequence[float]] | np.ndarray = 0.5,
    num_samples: int = 10000,
    n_valid: int = 2000,
    n_test: int = 2000,
    dim: int = 100,
    num_sin: int = 10,
    scale: float = 1.0,
    noise: float = 0.1,
    loss_scales: Sequence[float] | None = None,
    seed: int = 0,
) -> DataSplits:
    """The MMoE synthetic benchmark with K regression tasks of controlled correlation.

    Args:
        num_tasks: K.
        correlation: the cosine p between every pair of task weight vectors, or a K x K
            correlation matrix (symmetric, unit diagonal, positive semidefinite).
        num_samples: training rows.
        n_valid: validation rows.
        n_test: test rows.
        dim: input dimension d (needs d >= K).
        num_sin: number m of sinusoid terms.
        scale: the norm c of every ``w_k``.
        noise: standard deviation of the label noise ``eps_k``.
        loss_scales: optional per-task multipliers of the targets (length K).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        :class:`DataSplits` named ``"synthetic"`` with numeric features ``x0..x{d-1}`` and
        regression tasks ``task0..task{K-1}``. ``info`` holds the requested ``correlation``
        (scalar or matrix as given), ``correlation_matrix``, ``weight_cosine`` (measured
        cosines of the w's), ``label_correlation`` (measured on the train split) and
        ``label_correlation_all`` (all rows), the weights ``weights`` ((K, d) numpy array),
        ``alpha``, ``beta`` and the generation options.
    """
    k = int(num_tasks)
    mat = correlation_matrix(correlation, k)
    scales = _checked_loss_scales(k, dim, num_samples, n_valid, n_test, num_sin, noise, loss_scales)
    n_tr, n_va, n_te = int(num_samples), int(n_valid), int(n_test)
    rng = np.random.default_rng(seed)
    drawn = _draw(rng, mat, n_tr + n_va + n_te, dim, num_sin, scale, noise, scales)
    schema = FeatureSchema([f"x{i}" for i in range(dim)], [], [])
    specs = [TaskSpec(f"task{j}", "regression") for j in range(k)]
    full = TabularDataset(
        torch.from_numpy(drawn.x.astype(np.float32)),
        None,
        torch.from_numpy(drawn.y.astype(np.float32)),
        schema,
        specs,
    )
    options = {"dim": dim, "num_sin": num_sin, "scale": scale, "noise": noise}
    info = _info(correlation, mat, drawn, n_tr, options, scales, seed)
    bounds = np.cumsum([0, n_tr, n_va, n_te])
    parts = [full.subset(slice(int(bounds[i]), int(bounds[i + 1]))) for i in range(3)]
    return DataSplits(parts[0], parts[1], parts[2], "synthetic", info)
