"""The tracker's flat records: their keys, their aggregation over a history, and their JSON
and CSV encodings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["record_columns"]

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


def pair_key(a: str, b: str) -> str:
    return f"cos[{a},{b}]"


def record_columns(task_names: Sequence[str]) -> list[str]:
    """The keys of every tracker record, in order, for the given task names."""
    names = list(task_names)
    cols = ["step", "source", "level", "status", *SCALAR_KEYS]
    for prefix in ("loss", "norm", "weight", "update_cos"):
        cols.extend(f"{prefix}[{n}]" for n in names)
    cols.extend(
        pair_key(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
    )
    return cols


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
