"""Derived tables: the two cost claims (MultiBalance, MGDA-UB), MARIGOLD's K-scaling, the
diagnostics overhead and the TorchJD head-to-head, from the sections' rows."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from experiments.bench.results import find_row, pair_ratio

__all__ = ["derived_tables"]

#: the columns of the MARIGOLD K-scaling table: (key, section, mode)
_MARIGOLD_K_COLUMNS = (
    ("plain_dense", "param", "plain"),
    ("marigold_dense", "param", "param:marigold"),
    ("mgda_dense", "param", "param:mgda"),
    ("plain_sparse", "rep", "plain"),
    ("marigold_sparse", "rep", "param:marigold"),
    ("marigold_rep_sparse", "rep", "rep:marigold"),
)


def _ratio_fields(prefix: str, r: dict[str, Any]) -> dict[str, Any]:
    """``{prefix}``, ``{prefix}_min``, ``{prefix}_max``: a row's median ratio and its range."""
    return {prefix: r["ratio"], f"{prefix}_min": r["ratio_min"], f"{prefix}_max": r["ratio_max"]}


def _pair_row(
    sections: dict[str, Any],
    section: str,
    mode: str,
    base: str,
    k: int,
    fields: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], dict[str, Any]],
) -> dict[str, Any] | None:
    """The row ``{"K": k, **fields(ratio, row, base_row)}`` from the ratio of ``mode`` over
    ``base`` (same rounds) and both rows, or ``None`` when any is missing."""
    pr = pair_ratio(sections, section, mode, base, k)
    row = find_row(sections, section, mode, k)
    base_row = find_row(sections, section, base, k)
    if not pr or row is None or base_row is None:
        return None
    return {"K": k, **fields(pr, row, base_row)}


def _multibalance(sections: dict[str, Any], k: int) -> dict[str, Any] | None:
    rep = find_row(sections, "param", "rep:multibalance", k)
    par = find_row(sections, "param", "param:multibalance", k)
    rep_s = find_row(sections, "rep", "rep:multibalance", k)
    if not (rep or par or rep_s):
        return None
    return {
        "K": k,
        "rep_ratio": rep and rep["ratio"],
        "rep_qps_change": rep and (1 / rep["ratio"] - 1),
        "param_ratio": par and par["ratio"],
        "param_qps_change": par and (1 / par["ratio"] - 1),
        "rep_sparse_ratio": rep_s and rep_s["ratio"],
        "rep_sparse_qps_change": rep_s and (1 / rep_s["ratio"] - 1),
    }


def _mgda_ub_fields(pr: dict[str, Any], rep: dict[str, Any], par: dict[str, Any]) -> dict[str, Any]:
    """MGDA-UB (``rep:mgda``) against parameter-level MGDA: both times, ratio, saving, speed-up."""
    return {
        "rep_ms": rep["ms_per_step"],
        "param_ms": par["ms_per_step"],
        **_ratio_fields("time_ratio", pr),
        "time_saved": 1 - pr["ratio"],
        "speedup": 1 / pr["ratio"],
    }


def _mgda_ub(sections: dict[str, Any], k: int) -> dict[str, Any] | None:
    return _pair_row(sections, "param", "rep:mgda", "param:mgda", k, _mgda_ub_fields)


def _marigold_k(sections: dict[str, Any], k: int) -> dict[str, Any] | None:
    row: dict[str, Any] = {"K": k}
    for key, sec, mode in _MARIGOLD_K_COLUMNS:
        r = find_row(sections, sec, mode, k)
        if r:
            row[f"{key}_ms"] = r["ms_per_step"]
            row.update(_ratio_fields(f"{key}_ratio", r))
    measured = any(f"{key}_ms" in row for key, _, mode in _MARIGOLD_K_COLUMNS if mode != "plain")
    return row if measured else None  # plain steps alone: MARIGOLD and MGDA were not run


def _diagnostics_fields(
    d: dict[str, Any], tracker: dict[str, Any], mgda: dict[str, Any]
) -> dict[str, Any]:
    """The ConflictTracker's overhead on MGDA (median and range) and both times."""
    return {
        "overhead": d["ratio"] - 1,
        "overhead_min": d["ratio_min"] - 1,
        "overhead_max": d["ratio_max"] - 1,
        "mgda_ms": mgda["ms_per_step"],
        "tracker_ms": tracker["ms_per_step"],
    }


def _diagnostics(sections: dict[str, Any], k: int) -> dict[str, Any] | None:
    return _pair_row(sections, "rep", "rep:mgda+tracker", "rep:mgda", k, _diagnostics_fields)


def _h2h(sections: dict[str, Any], k: int) -> dict[str, Any] | None:
    entry: dict[str, Any] = {"K": k}
    for label, mode in (("param", "param:mgda"), ("rep", "rep:mgda")):
        pr = pair_ratio(sections, "h2h", "torchjd:mgda:emb", mode, k)
        if pr:
            entry.update(_ratio_fields(f"speedup_vs_{label}", pr))
    for mode in ("plain", "param:mgda", "rep:mgda", "torchjd:mgda:emb", "torchjd:mgda:noemb"):
        r = find_row(sections, "h2h", mode, k)
        if r:
            entry[f"{mode}_ms"] = r["ms_per_step"]
    return entry if len(entry) > 1 else None


def derived_tables(sections: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The two cost claims, MARIGOLD's K-scaling and the diagnostics overhead (per ``--tasks``),
    and the TorchJD head-to-head (per ``--h2h-tasks``); a K without its rows is left out."""
    tables = {
        "multibalance": _multibalance,
        "mgda_ub": _mgda_ub,
        "marigold_k": _marigold_k,
        "diagnostics": _diagnostics,
    }
    out: dict[str, Any] = {name: [] for name in tables}
    for k in args.tasks:
        for name, make in tables.items():
            row = make(sections, k)
            if row is not None:
                out[name].append(row)
    out["h2h"] = [e for e in (_h2h(sections, k) for k in args.h2h_tasks) if e is not None]
    return out
