"""Rolling windows over a tracker's history: the last ``window`` records of one source, and
:class:`RollingWindows`, which keeps the :func:`~._records.window_row` arrays of those records
per source so that each new record gets its rolling conflict rate and window cosines in
O(window * K^2) float operations (not a walk over dicts), rebuilt when the history was replaced
(``load_state_dict``, ``from_csv``)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._records import ROLLING_KEY, window_pair_key, window_row, window_stats

__all__ = ["RollingWindows", "recent_records"]

_SOURCES = ("balance", "probe")


def recent_records(
    history: Sequence[dict[str, Any]], source: str, window: int
) -> list[dict[str, Any]]:
    """The last ``window`` records of ``source``, oldest first."""
    out: list[dict[str, Any]] = []
    i = len(history)
    while i > 0 and len(out) < window:
        i -= 1
        if history[i]["source"] == source:
            out.append(history[i])
    out.reverse()
    return out


class RollingWindows:
    """The window rows of the last ``window`` records per source of one history list."""

    def __init__(self) -> None:
        self.rows: dict[str, deque[np.ndarray]] = {}
        self._of: list[dict[str, Any]] | None = None  # the history the rows were built from
        self._len = 0  # its length after the last append

    def append(
        self, history: list[dict[str, Any]], rec: dict[str, Any], names: Sequence[str], window: int
    ) -> None:
        """Append ``rec`` to ``history`` and fill its rolling-window entries (this record
        included): ``conflict_rate_rolling`` and per pair ``cos_window[a,b]``."""
        if self._of is not history or self._len != len(history):
            self.rows = {
                src: deque(
                    (window_row(r, names) for r in recent_records(history, src, window)),
                    maxlen=window,
                )
                for src in _SOURCES
            }
            self._of = history
        history.append(rec)
        self._len = len(history)
        rows = self.rows[rec["source"]]
        rows.append(window_row(rec, names))
        rate, m = window_stats(rows, len(names))
        rec[ROLLING_KEY] = rate
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                rec[window_pair_key(names[i], names[j])] = float(m[i, j])

    def balance_cosine(self, names: Sequence[str]) -> tuple[np.ndarray, int]:
        """``(mean cosine matrix, number of records with a Gram matrix)`` of the balance window."""
        rows = self.rows["balance"]
        matrix = window_stats(rows, len(names))[1]
        n_ok = sum(not math.isnan(float(r[-1])) for r in rows) if names else 0
        return matrix, n_ok
