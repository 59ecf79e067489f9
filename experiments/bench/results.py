"""Reading the results: a section's row by mode and K, ratios between two rows, a row's memory
measurement (CUDA or RSS), and the text of a cell."""

from __future__ import annotations

import math
from typing import Any

from experiments.bench.timing import ratio_summary

__all__ = ["find_row", "mem_view", "num", "pair_ratio", "plain_step_mb", "ratio_cell"]


def find_row(sections: dict[str, Any], section: str, mode: str, k: int) -> dict[str, Any] | None:
    """The measured row of ``mode`` at ``k`` in ``section`` (None: not run, failed or no ratio)."""
    data = sections.get(section)
    if not data:
        return None
    for r in data["results"]:
        if r["mode"] == mode and r["K"] == k and r.get("error") is None and "ratio" in r:
            row: dict[str, Any] = r
            return row
    return None


def pair_ratio(
    sections: dict[str, Any], section: str, num: str, den: str, k: int
) -> dict[str, Any] | None:
    """:func:`~experiments.bench.timing.ratio_summary` of mode ``num`` over mode ``den``, round
    by round (both timed in the same rounds of ``section`` at ``k``)."""
    a, b = find_row(sections, section, num, k), find_row(sections, section, den, k)
    if a is None or b is None:
        return None
    return ratio_summary([t / 1000 for t in a["times_ms"]], [t / 1000 for t in b["times_ms"]])


def mem_view(r: dict[str, Any]) -> dict[str, Any]:
    """A row's peak-memory measurement, CUDA or RSS: mb, ratio, step_mb, step_ratio, error."""
    if any(key.startswith("cuda_") for key in r):
        return {
            "mb": r.get("cuda_peak_mb"),
            "ratio": r.get("cuda_peak_ratio"),
            "step_mb": r.get("cuda_step_mb"),
            "step_ratio": r.get("cuda_step_ratio"),
            "error": r.get("cuda_error"),
        }
    return {
        "mb": r.get("rss_mb"),
        "ratio": r.get("rss_ratio"),
        "step_mb": r.get("rss_step_mb"),
        "step_ratio": r.get("rss_step_ratio"),
        "error": r.get("rss_error"),
    }


def plain_step_mb(sections: dict[str, Any], section: str, k: int) -> float | None:
    """The memory the plain step's steps add at ``k`` (None: not measured)."""
    for r in sections.get(section, {}).get("results", []):
        if r["mode"] == "plain" and r["K"] == k:
            step_mb: float | None = mem_view(r)["step_mb"]
            return step_mb
    return None


def ratio_cell(r: dict[str, Any]) -> str:
    """``median [min–max]`` of a row's ratio, ``error`` or ``–``."""
    if r.get("error"):
        return "error"
    if "ratio" not in r or r["ratio"] is None or math.isnan(r["ratio"]):
        return "–"
    return f"{r['ratio']:.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}]"


def num(v: Any, fmt: str = "{:.1f}") -> str:
    """``v`` formatted, or ``–`` for a missing value or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)
