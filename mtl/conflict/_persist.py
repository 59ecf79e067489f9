"""The tracker's files: the format tag of its state dict, strict JSON of the whole state (NaN as
``null``, infinities as strings: :func:`~._records.encode`), and the CSV table of its history
(one row per record, the columns of :func:`record_columns`). :class:`ConflictTracker`'s
``to_json`` / ``from_json`` / ``to_csv`` / ``from_csv`` are built on these."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

from ._records import csv_cell, decode_record, encode, record_columns, record_from_csv

__all__ = ["FORMAT", "VERSION", "read_csv", "read_json", "write_csv", "write_json"]

FORMAT = "mtl.ConflictTracker"
VERSION = 1


def write_json(path: str | PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` as strict JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(encode(state), f, indent=1, allow_nan=False)


def read_json(path: str | PathLike[str]) -> dict[str, Any]:
    """The state written by :func:`write_json`, its history decoded back to floats."""
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ConflictTracker JSON file")
    state["history"] = [decode_record(r) for r in state.get("history", [])]
    return state


def write_csv(
    path: str | PathLike[str], names: Sequence[str], history: Sequence[Mapping[str, Any]]
) -> None:
    """Write ``history`` as a CSV table, one row per record (:func:`record_columns`)."""
    cols = record_columns(names)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for r in history:
            writer.writerow([csv_cell(r.get(c, math.nan)) for c in cols])


def read_csv(path: str | PathLike[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(task names, history)`` of a :func:`write_csv` table; the task names are recovered
    from the ``norm[...]`` columns."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    names = [c[5:-1] for c in header if c.startswith("norm[") and c.endswith("]")]
    return names, [record_from_csv(header, row) for row in rows]
