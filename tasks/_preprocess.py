"""Shared tabular preprocessing: string-column encoding, category ids, standardization.

Conventions (used by the Census-Income and generic CSV loaders):

- A raw column is stored once as a vocabulary of distinct (whitespace-stripped) strings plus an
  int32 code per row (:class:`RawColumn`), which is compact and fast to re-use across seeds.
- Categorical columns: ids ``1..n`` are given to the categories seen in the TRAIN split, in
  sorted string order; id 0 is reserved for missing values (``"?"``, ``""`` by default) and for
  categories never seen in training. Cardinality = ``n + 1``.
- Numeric columns: parsed as float (missing tokens become NaN), optionally ``log1p``-transformed,
  then standardized with the TRAIN split's mean and standard deviation (a constant column gets
  std 1); missing values are imputed with the train mean, i.e. become 0 after standardization.
  A cell that parses as a number but is not finite (``inf``, ``nan``, ``1e999``) or lies beyond
  the float32 range (``|x| > 3.4e38``, e.g. ``1e200``: features are float32 tensors) is an error
  naming its row and column, unless ``invalid="missing"`` asks to treat such cells as missing.

Errors are :class:`tasks._data.DataError` (a ``ValueError``); the callers pass a ``locate``
function so that messages name the file and line of the offending row.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ._data import DataError

__all__ = [
    "DEFAULT_MISSING",
    "FLOAT32_MAX",
    "InvalidNumbers",
    "Locate",
    "RawColumn",
    "ColumnEncoder",
    "encode_strings",
    "gc_paused",
    "category_ids",
    "category_id_matrix",
    "numeric_values",
    "standardize",
]

DEFAULT_MISSING: tuple[str, ...] = ("?", "")

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest magnitude a numeric cell may have (features are float32 tensors)."""

InvalidNumbers = Literal["error", "missing"]
"""What to do with a numeric cell that is not finite or beyond :data:`FLOAT32_MAX`."""

Locate = Callable[[int], str]
"""Row index (0-based, in the loaded table) -> where it comes from, e.g. ``"f.csv: line 7"``."""


def _default_locate(row: int) -> str:
    return f"data row {row + 1}"


@dataclass(frozen=True)
class RawColumn:
    """A string column as ``vocab[codes]``: distinct stripped values and one code per row."""

    vocab: tuple[str, ...]
    codes: np.ndarray  # int32 (N,), read-only

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def take(self, rows: np.ndarray) -> RawColumn:
        """The rows ``rows`` (vocabulary unchanged)."""
        return RawColumn(self.vocab, _readonly(self.codes[rows]))

    def values(self) -> np.ndarray:
        """The column as an object array of strings (for user callables)."""
        out: np.ndarray = np.asarray(self.vocab, dtype=object)[self.codes]
        return out

    def first_row(self, flagged: np.ndarray) -> int:
        """The first row whose value is flagged in ``flagged`` (a bool per vocabulary entry);
        -1 when there is none."""
        if not len(self.vocab):
            return -1
        rows = np.flatnonzero(flagged[self.codes])
        return int(rows[0]) if len(rows) else -1

    def mask(self, accepted: Iterable[str]) -> np.ndarray:
        """Boolean ``(N,)``: the row's value is one of ``accepted``."""
        acc = set(accepted)
        hit = np.array([v in acc for v in self.vocab], dtype=bool)
        return hit[self.codes] if len(self.vocab) else np.zeros(len(self), dtype=bool)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class ColumnEncoder:
    """Incremental string -> int32 code encoder for one column (feed chunks, then finish)."""

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._chunks: list[np.ndarray] = []

    def add(self, values: Sequence[str]) -> None:
        """Append the codes of ``values`` (raw, unstripped strings)."""
        d = self._vocab
        self._chunks.append(np.array([d.setdefault(v, len(d)) for v in values], dtype=np.int32))

    def finish(self) -> RawColumn:
        """The column so far, with whitespace-stripped (and merged) vocabulary."""
        codes = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int32)
        stripped = [v.strip() for v in self._vocab]
        uniq: dict[str, int] = {}
        remap = np.array([uniq.setdefault(s, len(uniq)) for s in stripped], dtype=np.int32)
        if len(uniq) != len(stripped) and len(codes):
            codes = remap[codes]
        return RawColumn(tuple(uniq), _readonly(codes))


def encode_strings(values: Sequence[str]) -> RawColumn:
    """Encode a sequence of strings as a :class:`RawColumn` (values stripped of whitespace)."""
    enc = ColumnEncoder()
    with gc_paused():
        enc.add(values)
    return enc.finish()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (parsing creates millions of short-lived objects and
    the collector's repeated passes over them cost more than the parse itself); the previous
    state is restored on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def category_ids(
    col: RawColumn, train_rows: np.ndarray, missing: Iterable[str] = DEFAULT_MISSING
) -> tuple[np.ndarray, list[str]]:
    """Map a raw column to int64 category ids fitted on ``train_rows``.

    Returns:
        ``(ids, categories)``: ids ``(N,)`` with 0 for missing/unseen, and the list of
        categories such that id ``i >= 1`` means ``categories[i - 1]``; the cardinality is
        ``len(categories) + 1``.
    """
    v = len(col.vocab)
    seen = np.zeros(v, dtype=bool)
    if len(train_rows):
        seen[np.unique(col.codes[train_rows])] = True
    miss = set(missing)
    for i, s in enumerate(col.vocab):
        if s in miss:
            seen[i] = False
    kept = sorted(np.flatnonzero(seen).tolist(), key=lambda i: col.vocab[i])
    lut = np.zeros(v, dtype=np.int64)
    lut[kept] = np.arange(1, len(kept) + 1)
    ids = lut[col.codes] if v else np.zeros(len(col), dtype=np.int64)
    return ids, [col.vocab[i] for i in kept]


def category_id_matrix(
    table: Mapping[str, RawColumn],
    columns: Sequence[str],
    train_rows: np.ndarray,
    missing: Iterable[str] = DEFAULT_MISSING,
) -> tuple[np.ndarray | None, dict[str, list[str]]]:
    """:func:`category_ids` of each of ``columns`` of ``table``, stacked.

    Returns:
        ``(ids, categories)``: int64 ids ``(N, len(columns))`` (``None`` when ``columns`` is
        empty) and the category list of each column.
    """
    categories: dict[str, list[str]] = {}
    if not columns:
        return None, categories
    ids = []
    for c in columns:
        col_ids, cats = category_ids(table[c], train_rows, missing)
        ids.append(col_ids)
        categories[c] = cats
    return np.stack(ids, axis=1), categories


def numeric_values(
    col: RawColumn,
    name: str,
    missing: Iterable[str] = DEFAULT_MISSING,
    *,
    invalid: InvalidNumbers = "error",
    locate: Locate | None = None,
    invalid_hint: str = "",
) -> np.ndarray:
    """Parse a raw column as float64 ``(N,)``; missing tokens become NaN.

    Args:
        col: the column.
        name: its name (for messages).
        missing: tokens meaning "missing".
        invalid: a cell that parses but is not finite (``inf``, ``nan``, ``1e999``) or lies
            beyond :data:`FLOAT32_MAX` (``1e200``): ``"error"`` (default) or ``"missing"``
            (NaN, then imputed like a missing value).
        locate: row index -> location text for messages (default ``"data row R"``).
        invalid_hint: appended to the message of an out-of-range cell (how the caller's
            user can ask for ``invalid="missing"``).

    Raises:
        DataError: a value is neither a number nor a missing token, or (``invalid="error"``)
            is out of range; the message names the row and the column.
    """
    if invalid not in ("error", "missing"):
        raise ValueError(f"invalid must be 'error' or 'missing', got {invalid!r}")
    where = locate or _default_locate
    miss = set(missing)
    out = np.empty(len(col.vocab), dtype=np.float64)
    non_numeric = np.zeros(len(col.vocab), dtype=bool)
    out_of_range = np.zeros(len(col.vocab), dtype=bool)
    for i, s in enumerate(col.vocab):
        if s in miss:
            out[i] = np.nan
            continue
        try:
            v = float(s)
        except ValueError:
            non_numeric[i] = True
            out[i] = np.nan
            continue
        if not abs(v) <= FLOAT32_MAX:  # also true for nan
            out_of_range[i] = True
            v = np.nan
        out[i] = v
    if non_numeric.any():
        r = col.first_row(non_numeric)
        raise DataError(
            f"{where(r)}, column {name!r}: non-numeric value {col.vocab[col.codes[r]]!r} in a "
            f"numeric column; declare the column categorical or add the token to the missing "
            f"values"
        )
    if invalid == "error" and out_of_range.any():
        r = col.first_row(out_of_range)
        raise DataError(
            f"{where(r)}, column {name!r}: the value {col.vocab[col.codes[r]]!r} is not a finite "
            f"number within the float32 range (|x| <= {FLOAT32_MAX:.3g}); fix the cell or add "
            f"the token to the missing values{invalid_hint}"
        )
    return out[col.codes] if len(col.vocab) else np.zeros(len(col), dtype=np.float64)


def standardize(
    x: np.ndarray,
    train_rows: np.ndarray,
    names: Sequence[str] | None = None,
    locate: Locate | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardize the columns of ``x`` (N, d) with the train rows' mean/std.

    NaNs are imputed with the train mean (0 after standardization); a column that is constant
    (or all-NaN) on the train rows gets std 1 (and mean 0 when all-NaN).

    Args:
        x: the raw values (finite or NaN).
        train_rows: the rows whose statistics are used.
        names: the column names (for messages).
        locate: row index -> location text (for messages).

    Returns:
        ``(z, mean, std)`` with ``z`` float32 ``(N, d)``.

    Raises:
        DataError: a standardized value does not fit in float32 (a value far outside the train
            range of a nearly constant column), or ``x`` holds an infinity.
    """
    x = np.asarray(x, dtype=np.float64)
    tr = x[train_rows]
    d = x.shape[1]
    mean = np.zeros(d)
    std = np.ones(d)
    for j in range(d):
        col = tr[:, j]
        ok = col[~np.isnan(col)]
        if ok.size:
            mean[j] = ok.mean()
            s = ok.std()
            std[j] = s if s > 1e-12 else 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        z = (x - mean) / std
        z[np.isnan(x)] = 0.0
        z32 = z.astype(np.float32)
    bad = ~np.isfinite(z32)
    if bad.any():
        r, j = (int(v) for v in np.argwhere(bad)[0])
        col = names[j] if names is not None else f"#{j}"
        where = (locate or _default_locate)(r)
        raise DataError(
            f"{where}, column {col!r}: the value {x[r, j]!r} cannot be standardized within the "
            f"float32 range (train mean {mean[j]:.6g}, std {std[j]:.6g})"
        )
    return z32, mean, std
