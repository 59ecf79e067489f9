"""The tracker's flat records: their keys, their aggregation over a history, and their JSON
and CSV encodings."""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["record_columns", "record_scalars", "scalar_keys"]

STR_KEYS = ("source", "level", "status")
GRAM_KEYS = (
    "conflict_rate",
    "min_cosine",
    "mean_cosine",
    "magnitude_similarity_min",
    "magnitude_similarity_mean",
    "condition_number",
    "condition_number_aligned",
)
SCALAR_KEYS = (*GRAM_KEYS, "update_norm", "min_update_cosine")
ROLLING_KEY = "conflict_rate_rolling"


def pair_key(a: str, b: str) -> str:
    return f"cos[{a},{b}]"


def window_pair_key(a: str, b: str) -> str:
    return f"cos_window[{a},{b}]"


def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def record_columns(task_names: Sequence[str]) -> list[str]:
    """The keys of every tracker record, in order, for the given task names."""
    names = list(task_names)
    cols = ["step", "source", "level", "status", *SCALAR_KEYS, ROLLING_KEY]
    for prefix in ("loss", "norm", "weight", "update_cos"):
        cols.extend(f"{prefix}[{n}]" for n in names)
    cols.extend(pair_key(a, b) for a, b in _pairs(names))
    cols.extend(window_pair_key(a, b) for a, b in _pairs(names))
    return cols


# ---------------------------------------------------------------------- rolling windows
def rolling_nanmean(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """``out[t]`` = mean of the non-NaN values among ``values[t - window + 1 .. t]`` (NaN if none).

    Cumulative sums: O(n), no warning for an all-NaN window.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, v.size + 1)
    lo = np.maximum(hi - int(window), 0)
    count = ccnt[hi] - ccnt[lo]
    total = csum[hi] - csum[lo]
    out = np.full(v.size, np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def window_row(record: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    """One record's contribution to a rolling window: ``[rate, pair cosines.., diagonal..]``.

    The pair cosines are the record's ``cos[a,b]`` (row-major ``i < j``); the diagonal is 1 for a
    non-zero task and 0 for a zero task (as :func:`~mtl.conflict.cosine_matrix` defines it), NaN
    for a record without a Gram matrix (``status != "ok"``), whose cosines are NaN as well.
    """
    ok = record.get("status") == "ok"
    row = [float(record.get("conflict_rate", math.nan))]
    row.extend(float(record.get(pair_key(a, b), math.nan)) for a, b in _pairs(names))
    if ok:
        row.extend(1.0 if float(record.get(f"norm[{n}]", math.nan)) > 0.0 else 0.0 for n in names)
    else:
        row.extend(math.nan for _ in names)
    return np.array(row, dtype=np.float64)


def window_stats(rows: Sequence[np.ndarray], k: int) -> tuple[float, np.ndarray]:
    """``(mean conflict rate, mean (K, K) cosine matrix)`` of :func:`window_row` rows, NaN-aware
    (NaN where no row has a value)."""
    out = np.full((k, k), np.nan)
    if not len(rows):
        return math.nan, out
    means = _column_nanmean(np.stack(list(rows)))
    iu = np.triu_indices(k, 1)
    npairs = iu[0].size
    pairs = means[1 : 1 + npairs]
    out[iu] = pairs
    out[(iu[1], iu[0])] = pairs
    out[np.diag_indices(k)] = means[1 + npairs :]
    return float(means[0]), out


def window_cosine(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """The mean of the cosine matrices of ``records`` that have one (``status == "ok"``).

    Each record's ``(K, K)`` cosine matrix is rebuilt from its ``cos[a,b]`` entries and its
    diagonal from ``norm[name]`` (:func:`window_row`). All-NaN when no record has a Gram matrix.
    """
    return window_stats([window_row(r, names) for r in records], len(names))[1]


def _column_nanmean(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    count = ok.sum(axis=0)
    total = np.where(ok, a, 0.0).sum(axis=0)
    out = np.full(a.shape[1], np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


# ---------------------------------------------------------------------- flat scalar dicts
_TAGS = {
    "conflict_rate": "rate",
    ROLLING_KEY: "rate_rolling",
    "min_cosine": "min_cosine",
    "mean_cosine": "mean_cosine",
    "magnitude_similarity_min": "magnitude_similarity_min",
    "magnitude_similarity_mean": "magnitude_similarity_mean",
    "condition_number": "condition_number",
    "condition_number_aligned": "condition_number_aligned",
    "update_norm": "update_norm",
    "min_update_cosine": "min_update_cosine",
}
_PREFIX = {"balance": "conflict", "probe": "probe"}


def scalar_keys(task_names: Sequence[str], source: str = "balance") -> list[str]:
    """The keys of :func:`record_scalars` for records of ``source``, in order.

    Raises ``ValueError`` when two task pairs would share a key (names containing ``-`` such as
    ``["a-b", "c", "a", "b-c"]``).
    """
    return list(_scalar_map(tuple(task_names), source).values())


@functools.lru_cache(maxsize=32)
def _scalar_map(names: tuple[str, ...], source: str) -> dict[str, str]:
    """``{record key: scalar key}`` for one source (cached: read it, never modify it)."""
    if source not in _PREFIX:
        raise ValueError(f"source must be 'balance' or 'probe', got {source!r}")
    p = _PREFIX[source]
    out = {rk: f"{p}/{tag}" for rk, tag in _TAGS.items()}
    for n in names:
        out[f"norm[{n}]"] = f"{p}/norm/{n}"
    for n in names:
        out[f"update_cos[{n}]"] = f"{p}/update_cos/{n}"
    for a, b in _pairs(names):
        out[pair_key(a, b)] = f"{p}/cos/{a}-{b}"
    for a, b in _pairs(names):
        out[window_pair_key(a, b)] = f"{p}/cos_window/{a}-{b}"
    if source == "balance":
        for n in names:
            out[f"weight[{n}]"] = f"balance/weight/{n}"
        for n in names:
            out[f"loss[{n}]"] = f"balance/loss/{n}"
    counts = collections.Counter(out.values())
    dup = sorted(v for v, c in counts.items() if c > 1)
    if dup:
        raise ValueError(
            f"task names {list(names)} give the same scalar key twice ({dup}): pair keys join "
            "two names with '-'; rename the tasks"
        )
    return out


def record_scalars(
    record: Mapping[str, Any], task_names: Sequence[str], *, drop_nan: bool = False
) -> dict[str, float]:
    """One tracker record as a flat ``{key: float}`` dict (see :func:`scalar_keys`).

    Balance records give ``conflict/...`` and ``balance/weight/<name>``,
    ``balance/loss/<name>``; parameter-level probes ``probe/...``. Missing values are NaN, or
    left out with ``drop_nan=True``.
    """
    source = str(record.get("source", "balance"))
    out: dict[str, float] = {}
    for rk, sk in _scalar_map(tuple(task_names), source).items():
        v = float(record.get(rk, math.nan))
        if drop_nan and math.isnan(v):
            continue
        out[sk] = v
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


def summarize_records(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
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
            key = pair_key(names[i], names[j])
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


def encode(obj: Any) -> Any:
    if isinstance(obj, float):
        return _encode_float(obj)
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    return obj


def decode_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in rec.items():
        if key in STR_KEYS:
            out[key] = v
        elif key == "step":
            out[key] = int(v)
        elif v is None:
            out[key] = math.nan
        else:
            out[key] = float(v)  # float("Infinity") == inf
    return out


def csv_cell(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip repr; 'nan', 'inf'
    return str(v)


def record_from_csv(header: Sequence[str], row: Sequence[str]) -> dict[str, Any]:
    """One record from a row of :meth:`ConflictTracker.to_csv` output."""
    rec: dict[str, Any] = {}
    for col, cell in zip(header, row):
        if col in STR_KEYS:
            rec[col] = cell
        elif col == "step":
            rec[col] = int(cell)
        else:
            rec[col] = float(cell) if cell != "" else math.nan
    return rec
