"""UCI Census-Income (KDD): the MMoE / PLE multi-task benchmark.

The loader reads the unmodified UCI files (42 fields separated by ``", "``, no header, missing
values ``"?"``, labels ``" - 50000."`` / ``" 50000+."``), plain or gzipped, with the standard
library and numpy only.

Task groups (Ma et al., KDD 2018; ``reference/datasets.md``), and two mixed-scale groups:

===========  ==============================================  ==========================================
group        tasks (in target-column order)                  dropped from the inputs (besides
                                                             ``instance_weight`` and ``income_50k``)
===========  ==============================================  ==========================================
1            ``income``, ``never_married``                   ``marital_stat``
2            ``education``, ``never_married``                ``marital_stat``, ``education``,
                                                             ``hs_college``
3            ``income``, ``never_married``, ``education``    ``marital_stat``, ``education``,
                                                             ``hs_college``
mixed        ``income``, ``never_married``, ``weeks_worked``  ``marital_stat``, ``weeks_worked``,
                                                             ``num_emp``
mixed_sparse ``has_capital_gains``, ``never_married``,        ``capital_gains``, ``marital_stat``,
             ``weeks_worked``                                ``weeks_worked``, ``num_emp``
===========  ==============================================  ==========================================

- ``income``: ``income_50k == "50000+."`` (6.2 % positive on the test file).
- ``never_married``: ``marital_stat == "Never married"`` (43.2 %).
- ``education``: an associate degree or higher, i.e. ``education`` in :data:`EDUCATION_POSITIVE`
  (Associates either kind, Bachelors, Masters, Prof school, Doctorate; 19.5 %).
- ``weeks_worked`` (regression, raw units): weeks worked in the year, 0 to 52 (mean 23.2, std
  24.4; 48 % zeros). Its squared error is in the hundreds while the binary losses are below one:
  the mixed-scale setting of a CTR head next to a watch-time head. ``num_emp`` (persons worked
  for the employer) is dropped with it: it is zero exactly when ``weeks_worked`` is zero.
- ``has_capital_gains``: ``capital_gains > 0`` (3.7 % positive): a sparse-label task.

Binary tasks are stratified on in the re-split; regression targets are not.

``instance_weight`` is a survey weight and ``income_50k`` a label; neither is ever an input.

Features: the 7 continuous columns (:data:`NUMERIC_COLUMNS`) are numeric; the four heavy-tailed
money columns (:data:`LOG_COLUMNS`) go through ``sign(x) * log1p(|x|)`` first (``log_money``);
then every numeric column is standardized with the TRAIN split's mean and std. All other columns
are categorical: ids ``1..n`` for the categories seen in the train split (sorted by string), id 0
for missing (``"?"``) and unseen values.

Protocols:

- ``"resplit"`` (what the project uses; only ``census-income.test.gz`` is shipped): one file,
  stratified on the joint task labels into ``fractions`` (default 60/20/20) with ``seed``.
- ``"canonical"`` (when the 199,523-row ``census-income.data(.gz)`` is also available): the
  training file gives train and validation (a stratified ``valid_fraction``, default 10 %, of it,
  drawn with ``seed``), the test file is the test split.
- ``"auto"`` (default): canonical when both files are found, else resplit.

Files are looked up in: the explicit ``path`` (a file or a directory), else the directory in the
environment variable ``MTL_CENSUS_DIR``, else ``../shared/data/census-income-kdd/`` next to the
repository root. Parsed files are cached in memory (keyed on path, size and mtime), so loading
several seeds parses the file once; :func:`clear_cache` empties the cache.

This module parses the files and assembles the data set; the column tables and task groups live
in :mod:`tasks._census_tasks` and the file lookup in :mod:`tasks._census_files` (both
re-exported here).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ._census_files import (  # noqa: F401  (TEST_FILES, TRAIN_FILES, _find_in_dir re-exported)
    _DOWNLOAD_HELP,
    ENV_VAR,
    TEST_FILES,
    TRAIN_FILES,
    _find_in_dir,
    default_census_dir,
    resolve_census_files,
)
from ._census_tasks import (  # noqa: F401  (the unused ones re-exported)
    _ALWAYS_DROPPED,
    _GROUP_ALIASES,
    _REGRESSION_TASKS,
    _TASK_DROPS,
    CENSUS_COLUMNS,
    CENSUS_GROUPS,
    EDUCATION_POSITIVE,
    INCOME_NEGATIVE,
    INCOME_POSITIVE,
    LOG_COLUMNS,
    NEVER_MARRIED,
    NUMERIC_COLUMNS,
    _group_label,
    _input_columns,
    _label,
    _labels,
    _resolve_group,
    _strata,
)
from ._data import (
    DataError,
    DataSplits,
    FeatureSchema,
    TabularDataset,
    TaskSpec,
    stratified_split,
)
from ._gzip_files import _GZIP_ERRORS, _open_binary
from ._preprocess import (
    ColumnEncoder,
    Locate,
    RawColumn,
    category_id_matrix,
    gc_paused,
    numeric_values,
    standardize,
)

__all__ = [
    "CENSUS_COLUMNS",
    "NUMERIC_COLUMNS",
    "LOG_COLUMNS",
    "EDUCATION_POSITIVE",
    "CENSUS_GROUPS",
    "ENV_VAR",
    "load_census",
    "resolve_census_files",
    "default_census_dir",
    "clear_cache",
]

_NUM_FIELDS = len(CENSUS_COLUMNS)
_CHUNK_BYTES = 8 << 20

_RESPLIT_NOTE = (
    "re-split of the UCI test file (4x less training data than the paper): numbers "
    "are not comparable with published results"
)
_CANONICAL_NOTE = "canonical UCI train/test protocol"


# ---------------------------------------------------------------------------------- parsing
def _iter_blocks(f: gzip.GzipFile | io.BufferedReader) -> Iterator[bytes]:
    """Blocks of whole lines (each ending at a newline, except possibly the last one)."""
    carry = b""
    while True:
        block = f.read(_CHUNK_BYTES)
        if not block:
            if carry:
                yield carry
            return
        data = carry + block
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        carry = data[cut + 1 :]
        yield data[: cut + 1]


def _parse_block(
    block: bytes, first_line: int, path: Path, limit: int | None
) -> tuple[list[list[str]] | None, int]:
    """Split a block of lines into per-column lists (None if it has no data row), keeping at
    most ``limit`` data rows; also returns the number of lines in the block."""
    rows = block.decode("utf-8", errors="replace").replace("\r", "").split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    num_lines = len(rows)
    if any(not r.strip() for r in rows):  # blank lines (e.g. at the end of the file)
        rows = [r for r in rows if r.strip()]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return None, num_lines
    flat = ",".join(rows).split(",")
    if len(flat) != _NUM_FIELDS * len(rows):
        line = first_line
        for r in block.decode("utf-8", errors="replace").replace("\r", "").split("\n"):
            nf = r.count(",") + 1
            if r.strip() and nf != _NUM_FIELDS:
                raise DataError(
                    f"{path}: line {line} has {nf} comma-separated fields, expected "
                    f"{_NUM_FIELDS} (is this a UCI Census-Income (KDD) file?)"
                )
            line += 1
        raise DataError(f"{path}: malformed lines from line {first_line}")  # pragma: no cover
    return [flat[j::_NUM_FIELDS] for j in range(_NUM_FIELDS)], num_lines


@functools.lru_cache(maxsize=4)
def _read_table_cached(
    path: str, mtime_ns: int, size: int, max_rows: int | None
) -> tuple[dict[str, RawColumn], int]:
    del mtime_ns, size  # part of the cache key only
    p = Path(path)
    encoders = [ColumnEncoder() for _ in range(_NUM_FIELDS)]
    n = 0
    line_no = 1
    try:
        with gc_paused(), _open_binary(p) as f:
            for block in _iter_blocks(f):
                limit = None if max_rows is None else max_rows - n
                cols, num_lines = _parse_block(block, line_no, p, limit)
                line_no += num_lines
                if cols is not None:
                    for enc, col in zip(encoders, cols):
                        enc.add(col)
                    n += len(cols[0])
                if max_rows is not None and n >= max_rows:
                    break
    except _GZIP_ERRORS as e:
        raise DataError(
            f"{p}: cannot decompress the gzip data ({type(e).__name__}: {e}); the file is "
            f"truncated or corrupted: download it again"
        ) from None
    if n == 0:
        raise DataError(f"{p}: no data rows")
    table = {name: enc.finish() for name, enc in zip(CENSUS_COLUMNS, encoders)}
    bad = set(table["income_50k"].vocab) - {INCOME_POSITIVE, INCOME_NEGATIVE}
    if bad:
        raise DataError(
            f"{p}: unexpected income_50k labels {sorted(bad)[:5]} (expected "
            f"{INCOME_NEGATIVE!r} / {INCOME_POSITIVE!r}); is this a UCI Census-Income (KDD) file?"
        )
    return table, n


def _read_table(path: Path, max_rows: int | None) -> tuple[dict[str, RawColumn], int]:
    st = path.stat()
    return _read_table_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, max_rows)


def clear_cache() -> None:
    """Forget every parsed Census-Income file."""
    _read_table_cached.cache_clear()


def _concat(a: RawColumn, b: RawColumn) -> RawColumn:
    vocab: dict[str, int] = {v: i for i, v in enumerate(a.vocab)}
    remap = np.array([vocab.setdefault(v, len(vocab)) for v in b.vocab], dtype=np.int32)
    codes_b = remap[b.codes] if len(b.vocab) else b.codes
    codes = np.concatenate([a.codes, codes_b])
    codes.setflags(write=False)
    return RawColumn(tuple(vocab), codes)


# ---------------------------------------------------------------------------------- loader
def _subsample_rows(n: int, subsample: float | int | None, rng: np.random.Generator) -> np.ndarray:
    if subsample is None:
        return np.arange(n)
    if isinstance(subsample, float):
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample fraction must be in (0, 1], got {subsample}")
        m = max(1, int(round(float(subsample) * n)))
    else:
        m = int(subsample)
        if m < 1:
            raise ValueError(
                f"subsample must be a positive row count or a fraction, got {subsample}"
            )
    if m >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=m, replace=False))


class _Table(NamedTuple):
    """The rows to load, their labels, split and provenance."""

    table: dict[str, RawColumn]
    y: np.ndarray
    splits: tuple[np.ndarray, np.ndarray, np.ndarray]
    files: dict[str, str]
    locate: Locate


def _check_options(
    protocol: str, max_rows: int | None, valid_fraction: float, drop_columns: Sequence[str]
) -> None:
    """Check the options of :func:`load_census` other than the group and the files."""
    if protocol not in ("auto", "resplit", "canonical"):
        raise ValueError(f"protocol must be 'auto', 'resplit' or 'canonical', got {protocol!r}")
    if max_rows is not None and int(max_rows) < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    if not 0 < float(valid_fraction) < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    unknown = [c for c in drop_columns if c not in CENSUS_COLUMNS]
    if unknown:
        raise ValueError(f"drop_columns: unknown columns {unknown}")


def _canonical_table(
    train_file: Path,
    main_file: Path,
    task_names: Sequence[str],
    seed: int,
    valid_fraction: float,
    max_rows: int | None,
    subsample: float | int | None,
    rng: np.random.Generator,
) -> _Table:
    """The training file (split into train and valid) followed by the test file."""
    tab_tr, n_tr = _read_table(train_file, max_rows)
    tab_te, n_te = _read_table(main_file, max_rows)
    rows_tr = _subsample_rows(n_tr, subsample, rng)
    rows_te = _subsample_rows(n_te, subsample, rng)
    table = {c: _concat(tab_tr[c].take(rows_tr), tab_te[c].take(rows_te)) for c in CENSUS_COLUMNS}
    n_tr, n_te = len(rows_tr), len(rows_te)

    def locate(r: int) -> str:
        if r < n_tr:
            return f"{train_file}: data row {int(rows_tr[r]) + 1}"
        return f"{main_file}: data row {int(rows_te[r - n_tr]) + 1}"

    y = _labels(table, task_names, locate)
    vf = float(valid_fraction)
    tr, va = stratified_split(_strata(y[:n_tr], task_names), (1.0 - vf, vf), seed)
    te = np.arange(n_tr, n_tr + n_te)
    files = {"train": str(train_file), "test": str(main_file)}
    return _Table(table, y, (tr, va, te), files, locate)


def _resplit_table(
    main_file: Path,
    task_names: Sequence[str],
    seed: int,
    fractions: Sequence[float],
    max_rows: int | None,
    subsample: float | int | None,
    rng: np.random.Generator,
) -> _Table:
    """One file, stratified into train/valid/test ``fractions``."""
    tab, n_all = _read_table(main_file, max_rows)
    rows = _subsample_rows(n_all, subsample, rng)
    table = tab if len(rows) == n_all else {c: tab[c].take(rows) for c in CENSUS_COLUMNS}

    def locate(r: int) -> str:
        return f"{main_file}: data row {int(rows[r]) + 1}"

    y = _labels(table, task_names, locate)
    tr, va, te = stratified_split(_strata(y, task_names), fractions, seed)
    files = {"data": str(main_file)}
    return _Table(table, y, (tr, va, te), files, locate)


def _numeric_features(
    table: dict[str, RawColumn],
    num_cols: list[str],
    log_money: bool,
    tr: np.ndarray,
    locate: Locate,
) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray]:
    """Standardized numeric features (``None`` without numeric columns), train mean and std;
    :data:`LOG_COLUMNS` are log-transformed first when ``log_money``."""
    if not num_cols:
        return None, np.zeros(0), np.zeros(0)
    raw_num = np.stack([numeric_values(table[c], c, locate=locate) for c in num_cols], axis=1)
    if log_money:
        for j, c in enumerate(num_cols):
            if c in LOG_COLUMNS:
                raw_num[:, j] = np.sign(raw_num[:, j]) * np.log1p(np.abs(raw_num[:, j]))
    x_num, mean, std = standardize(raw_num, tr, num_cols, locate)
    return torch.from_numpy(x_num), mean, std


def _load_table(
    task_names: Sequence[str],
    path: str | os.PathLike[str] | None,
    train_path: str | os.PathLike[str] | None,
    protocol: str,
    seed: int,
    fractions: Sequence[float],
    valid_fraction: float,
    max_rows: int | None,
    subsample: float | int | None,
) -> tuple[_Table, bool]:
    """Locate the files and load the rows of the protocol in use, and whether it is the
    canonical one (a training file is available and ``protocol`` is not ``"resplit"``).

    Raises:
        FileNotFoundError: the files are missing, or ``protocol="canonical"`` without a
            training file.
    """
    main_file, train_file = resolve_census_files(path, train_path)
    if protocol == "canonical" and train_file is None:
        raise FileNotFoundError(
            "protocol='canonical' needs the UCI training file census-income.data(.gz) next to "
            f"{main_file} or given as train_path. {_DOWNLOAD_HELP}"
        )
    rng = np.random.default_rng(seed)
    if train_file is not None and protocol != "resplit":
        canonical = _canonical_table(
            train_file, main_file, task_names, seed, valid_fraction, max_rows, subsample, rng
        )
        return canonical, True
    return _resplit_table(main_file, task_names, seed, fractions, max_rows, subsample, rng), False


def _dataset(
    loaded: _Table, task_names: Sequence[str], drop_columns: Sequence[str], log_money: bool
) -> tuple[TabularDataset, dict[str, Any]]:
    """Every loaded row as one dataset (inputs fitted on the train split), and the ``info``
    entries that describe its inputs: dropped and log-transformed columns, numeric mean/std,
    the category list of each categorical column."""
    table, y, (tr, _, _), _, locate = loaded
    dropped, num_cols, cat_cols = _input_columns(task_names, drop_columns)
    x_num_t, mean, std = _numeric_features(table, num_cols, log_money, tr, locate)
    x_cat, categories = category_id_matrix(table, cat_cols, tr)
    x_cat_t = None if x_cat is None else torch.from_numpy(x_cat)
    schema = FeatureSchema(num_cols, cat_cols, [len(categories[c]) + 1 for c in cat_cols])
    specs = [TaskSpec(t, "regression" if t in _REGRESSION_TASKS else "binary") for t in task_names]
    full = TabularDataset(x_num_t, x_cat_t, torch.from_numpy(y), schema, specs)
    inputs: dict[str, Any] = {
        "dropped_columns": dropped,
        "log_money": bool(log_money),
        "log_columns": [c for c in num_cols if c in LOG_COLUMNS] if log_money else [],
        "numeric_mean": mean.tolist(),
        "numeric_std": std.tolist(),
        "categories": categories,
    }
    return full, inputs


def load_census(
    group: int | str | Sequence[str] = 2,
    path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    train_path: str | os.PathLike[str] | None = None,
    protocol: Literal["auto", "resplit", "canonical"] = "auto",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    valid_fraction: float = 0.1,
    max_rows: int | None = None,
    subsample: float | int | None = None,
    log_money: bool = True,
    drop_columns: Sequence[str] = (),
) -> DataSplits:
    """Load UCI Census-Income (KDD) as a multi-task problem (binary tasks, and a raw-unit
    regression in the mixed-scale groups).

    Args:
        group: 1 (income, never_married), 2 (education, never_married; default),
            3 / ``"3task"`` (income, never_married, education), ``"mixed"`` (income,
            never_married, weeks_worked), ``"mixed_sparse"`` (has_capital_gains, never_married,
            weeks_worked), or a sequence of task names from ``("income", "never_married",
            "education", "weeks_worked", "has_capital_gains")``.
        path: a file or directory (see :func:`resolve_census_files`); ``None`` uses
            ``$MTL_CENSUS_DIR`` or the shared data directory.
        seed: seed of the stratified split (and of ``subsample``).
        train_path: the UCI training file ``census-income.data(.gz)``; with it (or with one
            found in the directory) the canonical protocol is used.
        protocol: ``"auto"`` (canonical if a training file is available), ``"resplit"`` or
            ``"canonical"`` (error without a training file).
        fractions: train/valid/test fractions of the re-split protocol.
        valid_fraction: part of the training file held out (stratified) as validation in the
            canonical protocol.
        max_rows: read only the first ``max_rows`` rows of each file (smoke tests).
        subsample: keep a random subset of each file's rows (a fraction in (0, 1) or a count),
            drawn with ``seed`` before splitting.
        log_money: apply ``sign(x) * log1p(|x|)`` to :data:`LOG_COLUMNS` before standardizing.
        drop_columns: extra input columns to drop.

    Returns:
        :class:`DataSplits` named ``"census-income/group<g>"``; ``info`` records the protocol,
        files, seed, dropped columns, numeric mean/std and the category list of each
        categorical column (id ``i >= 1`` is ``info["categories"][col][i - 1]``).

    Raises:
        FileNotFoundError: the data files are missing (the message says what to download).
        ValueError: bad options.
        DataError: (a ``ValueError``) a file that is not in the UCI format, a truncated or
            corrupted gzip file, a bad numeric cell; the message names the file.
    """
    task_names, group_label = _resolve_group(group)
    _check_options(protocol, max_rows, valid_fraction, drop_columns)
    loaded, canonical = _load_table(
        task_names, path, train_path, protocol, seed, fractions, valid_fraction, max_rows, subsample
    )
    full, inputs = _dataset(loaded, task_names, drop_columns, log_money)
    info: dict[str, Any] = {
        "dataset": "census-income-kdd",
        "group": group_label,
        "tasks": list(task_names),
        "protocol": "canonical" if canonical else "resplit",
        "files": loaded.files,
        "seed": seed,
        "fractions": [float(f) for f in fractions] if not canonical else None,
        "valid_fraction": float(valid_fraction) if canonical else None,
        "max_rows": max_rows,
        "subsample": subsample,
        "num_rows": int(loaded.y.shape[0]),
        **inputs,
        "note": _CANONICAL_NOTE if canonical else _RESPLIT_NOTE,
    }
    tr, va, te = loaded.splits
    return DataSplits(
        full.subset(tr), full.subset(va), full.subset(te), f"census-income/{group_label}", info
    )
