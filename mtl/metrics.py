"""Evaluation metrics for multi-task ranking: AUC, group AUC, calibration, log loss, normalized
entropy, MSE, Δm.

Every function accepts 1-D torch tensors (any device, detached internally) or numpy arrays (or
sequences of numbers), computes in float64 and returns a Python ``float`` (or a dict of floats).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = [
    "auc",
    "binary_metrics",
    "calibration",
    "delta_m",
    "gauc",
    "log_loss",
    "mse",
    "normalized_entropy",
    "regression_metrics",
]

ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float]
Float64Array: TypeAlias = NDArray[np.float64]
#: group ids (user, query...): integers or strings, one per row.
GroupsLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[int] | Sequence[str]


def _as_array(x: ArrayLike, name: str) -> Float64Array:
    """Convert to a 1-D float64 numpy array, raising ``ValueError`` on bad shape or NaN."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
        arr = x.detach().cpu().double().numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _pair(
    y_true: ArrayLike, other: ArrayLike, other_name: str
) -> tuple[Float64Array, Float64Array]:
    y = _as_array(y_true, "y_true")
    o = _as_array(other, other_name)
    if y.shape != o.shape:
        raise ValueError(f"y_true and {other_name} have different lengths: {y.size} vs {o.size}")
    return y, o


def _check_labels(y: Float64Array, *, binary: bool) -> None:
    if binary:
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("y_true must contain only 0/1 labels")
    elif (y < 0.0).any() or (y > 1.0).any():
        raise ValueError("y_true must lie in [0, 1]")


def auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """ROC-AUC by the Mann–Whitney rank statistic.

    ``AUC = (Σ_{i: y_i=1} rank_i − n₊(n₊+1)/2) / (n₊ n₋)`` with average ranks of ``scores``
    (ascending), so a tied positive/negative pair counts 1/2. Equals the probability that a
    random positive scores higher than a random negative. Scores may be logits or probabilities
    (AUC is invariant to monotone maps).

    Raises:
        ValueError: labels other than 0/1, only one class present, NaN or mismatched lengths.
    """
    y, s = _pair(y_true, scores, "scores")
    _check_labels(y, binary=True)
    pos = y == 1.0
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC is undefined when y_true contains only one class")
    ranks = _average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(s: Float64Array) -> Float64Array:
    """1-based ranks of ``s`` (ascending), tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    first = np.flatnonzero(starts_group)  # 0-based start of each group of ties
    end = np.append(first[1:], s.size)  # exclusive end
    group_rank = (first + end + 1) / 2.0  # mean of the ranks first + 1 .. end
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = group_rank[np.cumsum(starts_group) - 1]
    return ranks


def _group_ids(groups: GroupsLike, n: int) -> NDArray[Any]:
    """``groups`` as a 1-D numpy array of ``n`` sortable ids (numbers, strings or objects)."""
    if isinstance(groups, torch.Tensor):
        if groups.is_complex():
            raise ValueError(f"groups must be integer or string ids, got dtype {groups.dtype}")
        t = groups.detach().cpu()
        arr = (t.double() if t.is_floating_point() else t).numpy()
    else:
        arr = np.asarray(groups)
    if arr.dtype.kind not in "biufUSO":
        raise ValueError(f"groups must be integer or string ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {arr.shape}")
    if arr.size != n:
        raise ValueError(f"y_true and groups have different lengths: {n} vs {arr.size}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError("groups contains NaN")
    if arr.dtype.kind == "O" and (arr == np.array(None)).any():
        raise ValueError("groups contains None")
    return arr


def _row_weights(weights: ArrayLike, n: int) -> Float64Array:
    """The per-row weights of :func:`gauc` as float64: ``n`` finite non-negative values."""
    w_rows = _as_array(weights, "weights")
    if w_rows.size != n:
        raise ValueError(f"y_true and weights have different lengths: {n} vs {w_rows.size}")
    if not np.isfinite(w_rows).all() or (w_rows < 0.0).any():
        raise ValueError("weights must be finite and non-negative")
    return w_rows


def _group_score_order(g: NDArray[Any], s: Float64Array) -> NDArray[np.intp]:
    """The permutation that sorts the rows by group, then by score within the group."""
    try:
        return np.lexsort((s, g))
    except TypeError as e:
        raise ValueError(
            f"groups must be ids of one sortable type (all ints or all strings): {e}"
        ) from None


def _ranks_within_groups(
    gs: NDArray[Any], ss: Float64Array
) -> tuple[NDArray[np.intp], Float64Array, int]:
    """``(code, ranks, n_groups)`` of rows sorted by group then score (``gs``, ``ss``).

    ``code`` is the dense group index of each row, ``ranks`` its 1-based score rank within its
    group (tied rows share the mean of their ranks), ``n_groups`` the number of groups.
    """
    n = gs.size
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.asarray(gs[1:] != gs[:-1], dtype=bool)
    new_block = new_group.copy()  # a block of tied scores never spans two groups
    new_block[1:] |= ss[1:] != ss[:-1]
    code = np.cumsum(new_group) - 1  # dense group index of each sorted row
    group_first = np.flatnonzero(new_group)  # 0-based position of each group's first row
    block_first = np.flatnonzero(new_block)
    block_end = np.append(block_first[1:], n)
    # 1-based rank within the group: tied rows share the mean of their global positions, minus
    # the group's offset
    mean_pos = (block_first + block_end + 1) / 2.0
    ranks = mean_pos[np.cumsum(new_block) - 1] - group_first[code]
    return code, ranks, group_first.size


def gauc(
    y_true: ArrayLike,
    y_score: ArrayLike,
    groups: GroupsLike,
    weights: ArrayLike | None = None,
) -> float:
    """Group AUC: the ROC-AUC of each group (user, query, session...) averaged over the groups.

    ``GAUC = Σ_g w_g AUC_g / Σ_g w_g`` over the groups ``g`` that hold both classes, with
    ``AUC_g`` the Mann–Whitney AUC of the rows of group ``g`` (ties count 1/2, as in :func:`auc`)
    and ``w_g`` the group's number of rows (impressions) by default, or the sum of the given
    per-row ``weights`` over the group's rows (e.g. ``weights=y_true`` weights each group by its
    clicks). The row weights only weight the groups: they do not weight pairs inside a group.

    Groups with a single class are skipped (their AUC is undefined), the industry convention
    (Zhou et al., "Deep Interest Network", KDD 2018, eq. 10; Zhu et al., "Optimized Cost per
    Click in Taobao Display Advertising", KDD 2017). With a single group GAUC equals
    :func:`auc`. Example: groups ``a = [0, 0, 1, 1]`` (AUC 0.75), ``b = [1, 0]`` scored ``[0.9,
    0.2]`` (AUC 1), ``c = [1, 1]`` (skipped) → ``(4 · 0.75 + 2 · 1) / 6 = 0.8333``.

    Computed without a Python loop over groups: one ``lexsort`` by (group, score), tie-aware
    average ranks within each group, per-group rank sums by ``bincount``. O(N log N).

    Args:
        y_true: 0/1 labels.
        y_score: scores (logits or probabilities: each group's AUC is invariant to monotone maps).
        groups: one group id per row: integers, strings (any sortable ids of one type).
        weights: optional non-negative finite per-row weights, summed per group.

    Raises:
        ValueError: labels other than 0/1, NaN, mismatched lengths, a negative or non-finite
            weight, no group holding both classes, or group weights summing to 0.
    """
    y, s = _pair(y_true, y_score, "y_score")
    _check_labels(y, binary=True)
    g = _group_ids(groups, y.size)
    w_rows = None if weights is None else _row_weights(weights, y.size)
    order = _group_score_order(g, s)
    ys = y[order]
    code, ranks, n_groups = _ranks_within_groups(g[order], s[order])
    size = np.bincount(code, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(code, weights=ys, minlength=n_groups)
    n_neg = size - n_pos
    rank_sum = np.bincount(code, weights=ranks * ys, minlength=n_groups)
    both = (n_pos > 0.0) & (n_neg > 0.0)
    if not both.any():
        raise ValueError(
            f"GAUC is undefined: none of the {n_groups} groups holds both classes "
            "(every group is all 0 or all 1)"
        )
    w = size if w_rows is None else np.bincount(code, weights=w_rows[order], minlength=n_groups)
    w_both = w[both]
    total = float(w_both.sum())
    if not total > 0.0:
        raise ValueError("GAUC is undefined: the weights of the groups with both classes sum to 0")
    p, q = n_pos[both], n_neg[both]
    group_auc = (rank_sum[both] - p * (p + 1.0) / 2.0) / (p * q)
    return float(np.dot(w_both, group_auc) / total)


def calibration(y_true: ArrayLike, p: ArrayLike, *, from_logits: bool = False) -> float:
    """Predicted over observed positive rate: ``mean(p) / mean(y_true)``.

    1 is calibrated on average, above 1 over-predicts, below 1 under-predicts (the "calibration"
    of ads click models, He et al., ADKDD 2014). Takes probabilities, or logits with
    ``from_logits=True`` (mapped by a stable sigmoid), like :func:`log_loss`. Example:
    ``y = [1, 0, 0, 0]``, ``p = [0.5, 0.1, 0.1, 0.1]`` → ``0.2 / 0.25 = 0.8``.

    Args:
        y_true: labels in ``[0, 1]`` (0/1, or soft labels).
        p: probabilities in ``[0, 1]``, or logits if ``from_logits``.
        from_logits: interpret ``p`` as logits (default False).

    Raises:
        ValueError: no positive label (the observed rate is 0), probabilities outside
            ``[0, 1]``, NaN or mismatched lengths.
    """
    y, q = _pair(y_true, p, "p")
    _check_labels(y, binary=False)
    if from_logits:
        q = np.exp(-np.logaddexp(0.0, -q))  # σ(x) = 1 / (1 + e^-x) without overflow
    elif (q < 0.0).any() or (q > 1.0).any():
        raise ValueError("probabilities p must lie in [0, 1] (pass from_logits=True for logits)")
    observed = float(y.mean())
    if observed == 0.0:
        raise ValueError(
            "calibration is undefined when y_true has no positive label (observed rate 0)"
        )
    return float(q.mean()) / observed


def _log_loss_array(
    y: Float64Array, p: Float64Array, from_logits: bool, eps: float
) -> Float64Array:
    if from_logits:
        # -[y log σ(x) + (1-y) log(1-σ(x))] = softplus(x) - y x = logaddexp(0, x) - y x
        return np.logaddexp(0.0, p) - y * p
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if (p < 0.0).any() or (p > 1.0).any():
        raise ValueError("probabilities p must lie in [0, 1] (pass from_logits=True for logits)")
    q = np.clip(p, eps, 1.0 - eps)
    return -(y * np.log(q) + (1.0 - y) * np.log1p(-q))


def log_loss(
    y_true: ArrayLike, p: ArrayLike, *, from_logits: bool = False, eps: float = 1e-7
) -> float:
    """Mean binary cross-entropy ``−(1/N) Σ_i [y_i log p_i + (1−y_i) log(1−p_i)]``.

    Args:
        y_true: labels in ``[0, 1]`` (0/1, or soft labels).
        p: probabilities, clipped to ``[eps, 1 − eps]``; or logits if ``from_logits``, in which case
            the stable form ``softplus(x) − y·x`` is used and no clipping happens.
        from_logits: interpret ``p`` as logits (default False).
        eps: clipping for probabilities (default 1e-7).
    """
    y, q = _pair(y_true, p, "p")
    _check_labels(y, binary=False)
    return float(_log_loss_array(y, q, from_logits, eps).mean())


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1.0 - p) * math.log1p(-p))


def normalized_entropy(
    y_true: ArrayLike,
    p: ArrayLike,
    *,
    from_logits: bool = False,
    base_rate: float | None = None,
    eps: float = 1e-7,
) -> float:
    """Normalized entropy (He et al., ADKDD 2014): log loss / entropy of the background rate.

    ``NE = log_loss(y, p) / H(p̄)`` with ``H(q) = −[q log q + (1−q) log(1−q)]`` and
    ``p̄ = mean(y_true)`` unless ``base_rate`` is given. Lower is better; predicting the constant
    ``p̄`` gives 1. Example: ``y = [1,0,0,0]``, ``p = [0.5,0.1,0.1,0.1]`` → 0.252307 / 0.562335
    = 0.448678.

    Args:
        y_true: labels in ``[0, 1]``.
        p: probabilities, or logits if ``from_logits`` (see :func:`log_loss`).
        from_logits: interpret ``p`` as logits (default False).
        base_rate: background positive rate ``p̄`` (default: the mean label of ``y_true``).
        eps: probability clipping passed to :func:`log_loss` (default 1e-7).

    Raises:
        ValueError: when ``p̄`` is 0 or 1 (or outside (0, 1)): the normalizer is then 0.
    """
    y, q = _pair(y_true, p, "p")
    _check_labels(y, binary=False)
    rate = float(y.mean()) if base_rate is None else float(base_rate)
    if not 0.0 < rate < 1.0:
        raise ValueError(
            f"normalized entropy is undefined for a background positive rate of {rate} "
            "(it must lie strictly between 0 and 1)"
        )
    return float(_log_loss_array(y, q, from_logits, eps).mean()) / _binary_entropy(rate)


def mse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean squared error ``(1/N) Σ_i (y_i − ŷ_i)²``."""
    y, q = _pair(y_true, y_pred, "y_pred")
    return float(np.mean((y - q) ** 2))


def delta_m(
    metrics: Mapping[str, float],
    baselines: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Average relative improvement over a baseline, in percent (Maninis et al., CVPR 2019).

    ``Δm = (100 / T) Σ_t (−1)^{l_t} (M_t − B_t) / |B_t|`` with ``l_t = 1`` if LOWER is better for
    metric ``t`` (``higher_is_better[t]`` False) and ``l_t = 0`` otherwise, ``M_t`` the method's
    value and ``B_t`` the baseline's (typically single-task learning), over the ``T`` metric names.
    A positive Δm means improvement. For positive baselines ``|B_t| = B_t`` and this is the
    standard formula; the absolute value keeps the sign convention for negative baselines. Note
    that some later papers flip the sign (lower Δm better); this function does not.

    Example: metrics ``{"auc": 0.77, "mse": 0.9}``, baselines ``{"auc": 0.7, "mse": 1.0}`` →
    ``(10 % + 10 %) / 2 = 10.0``.

    Raises:
        ValueError: empty input, mismatched metric names, a zero or non-finite baseline.
    """
    names = set(metrics)
    if not names:
        raise ValueError("delta_m needs at least one metric")
    if names != set(baselines) or names != set(higher_is_better):
        raise ValueError(
            "metrics, baselines and higher_is_better must have the same keys; got "
            f"{sorted(metrics)}, {sorted(baselines)}, {sorted(higher_is_better)}"
        )
    total = 0.0
    for name in metrics:
        m = float(metrics[name])
        b = float(baselines[name])
        if not math.isfinite(b) or b == 0.0:
            raise ValueError(f"baseline for {name!r} must be finite and non-zero, got {b}")
        if not math.isfinite(m):
            raise ValueError(f"metric {name!r} is not finite: {m}")
        sign = 1.0 if higher_is_better[name] else -1.0
        total += sign * (m - b) / abs(b)
    return 100.0 * total / len(names)


def binary_metrics(y_true: ArrayLike, logits: ArrayLike) -> dict[str, float]:
    """``{"auc", "log_loss", "ne"}`` of a binary task from its logits (see :func:`auc`,
    :func:`log_loss`, :func:`normalized_entropy`; raises when ``y_true`` has one class).

    The key set is fixed (callers and results files rely on it): :func:`calibration` and
    :func:`gauc` (which needs group ids) are separate calls."""
    return {
        "auc": auc(y_true, logits),
        "log_loss": log_loss(y_true, logits, from_logits=True),
        "ne": normalized_entropy(y_true, logits, from_logits=True),
    }


def regression_metrics(y_true: ArrayLike, pred: ArrayLike) -> dict[str, float]:
    """``{"mse"}`` of a regression task."""
    return {"mse": mse(y_true, pred)}
