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
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_MISSING",
    "RawColumn",
    "ColumnEncoder",
    "encode_strings",
    "gc_paused",
    "category_ids",
    "numeric_values",
    "standardize",
]

DEFAULT_MISSING: tuple[str, ...] = ("?", "")


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
        return np.asarray(self.vocab, dtype=object)[self.codes]

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


def numeric_values(
    col: RawColumn, name: str, missing: Iterable[str] = DEFAULT_MISSING
) -> np.ndarray:
    """Parse a raw column as float64 ``(N,)``; missing tokens become NaN.

    Raises:
        ValueError: a value is neither a number nor a missing token (names the column).
    """
    miss = set(missing)
    out = np.empty(len(col.vocab), dtype=np.float64)
    for i, s in enumerate(col.vocab):
        if s in miss:
            out[i] = np.nan
            continue
        try:
            out[i] = float(s)
        except ValueError:
            raise ValueError(
                f"numeric column {name!r} has the non-numeric value {s!r}; declare the column "
                f"categorical or add the token to the missing values"
            ) from None
    return out[col.codes] if len(col.vocab) else np.zeros(len(col), dtype=np.float64)


def standardize(x: np.ndarray, train_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardize the columns of ``x`` (N, d) with the train rows' mean/std.

    NaNs are imputed with the train mean (0 after standardization); a column that is constant
    (or all-NaN) on the train rows gets std 1 (and mean 0 when all-NaN).

    Returns:
        ``(z, mean, std)`` with ``z`` float32 ``(N, d)``.
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
    z = (x - mean) / std
    z[np.isnan(z)] = 0.0
    return z.astype(np.float32), mean, std
