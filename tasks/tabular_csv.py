"""Generic multi-task tabular data from a delimited text file with a header row.

Each task is defined over ONE column, either by a small expression (parsed by a tiny
tokenizer, never ``eval``) or by a callable:

====================================  ================================================  ========
task definition                        meaning                                           kind
====================================  ================================================  ========
``"income == '>50K'"``                 string equality (values are whitespace-stripped)  binary
``"clicks > 0"``                       numeric comparison: ``== != > >= < <=``           binary
``"col in ('a', 'b')"``               membership (``not in`` too); numbers compare        binary
                                       numerically, strings as strings
``"watch_time"``                       the column itself as a number                     inferred
``callable(columns)``                  ``columns[name]`` is an object array of the       inferred
                                       column's stripped strings; return ``(N,)`` values
====================================  ================================================  ========

Column names that are not identifiers are written in backticks: ``"`click rate` > 0.1"``.
"Inferred" means binary when every value is 0 or 1, regression otherwise; ``task_kinds``
overrides. A binary task with a single class is an error. A label cell for which the expression
has no truth value is an error naming its line and column: a missing, non-numeric or ``nan``
cell under ``> >= < <=``, a ``nan`` cell compared with a number, a missing or non-finite cell
of a bare column (labels are never imputed).

A ``group_column`` (the user, query or session of each row) is read as opaque string ids into
``TabularDataset.groups`` (int64 ids, the same id for the same string in every split) for group
metrics such as GAUC (:func:`mtl.metrics.gauc`); it is never an input feature (naming it in
``numeric``/``categorical`` too is an error) and a missing group id is an error naming its line.

Preprocessing is the Census-Income one (:mod:`tasks._preprocess`): numeric features are
standardized with the train split's mean/std (missing values, ``""`` or ``"?"`` by default, are
imputed with the train mean, i.e. 0); categorical features get ids ``1..n`` for the categories
seen in the train split and id 0 for missing or unseen values. The split is stratified on the
joint labels of the binary tasks (:func:`tasks.stratified_split`).

Bad input is a :class:`~tasks._data.DataError` (a ``ValueError``) naming the file, and for a
cell its line, data row and column: a numeric feature cell that is not finite or beyond the
float32 range (unless ``invalid_numbers="missing"``), bytes the encoding cannot decode (a UTF-8
byte-order mark is skipped), a field over the csv module's limit, a corrupted gzip file.

The expression grammar lives in :mod:`tasks._csv_expr` and the file reading in
:mod:`tasks._csv_read` (both re-exported here); this module checks the options, builds the
targets, groups and features, and assembles the data set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._csv_expr import (  # noqa: F401  (the unused ones re-exported)
    _COMPARISONS,
    _TOKEN,
    TaskExpression,
    _as_float,
    _comparison,
    _describe,
    _evaluate,
    _literal,
    _membership,
    _tokenize,
    parse_task_expression,
)
from ._csv_read import (  # noqa: F401  (the unused ones re-exported)
    _decode_error,
    _read_rows,
    _row_locator,
    _text_encoding,
    _undecodable_line,
)
from ._data import (
    DataError,
    DataSplits,
    FeatureSchema,
    TabularDataset,
    TaskKind,
    TaskSpec,
    stratified_split,
)
from ._gzip_files import _GZIP_ERRORS, _is_gzip, _open_binary  # noqa: F401  (re-exported)
from ._preprocess import (
    DEFAULT_MISSING,
    FLOAT32_MAX,
    InvalidNumbers,
    Locate,
    RawColumn,
    category_id_matrix,
    encode_strings,
    gc_paused,
    numeric_values,
    standardize,
)

__all__ = ["load_csv", "TaskExpression", "parse_task_expression"]

TaskDefinition = str | Callable[[Mapping[str, np.ndarray]], Any]


class _LazyColumns(Mapping[str, np.ndarray]):
    """Column name -> object array of stripped strings, built on first access."""

    def __init__(self, raw: dict[str, RawColumn]) -> None:
        self._raw = raw
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._raw:
            raise KeyError(f"no column {key!r}; columns: {list(self._raw)}")
        if key not in self._cache:
            self._cache[key] = self._raw[key].values()
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


_INVALID_HINT = (
    ", or pass invalid_numbers='missing' (--set data.invalid_numbers=missing on the command "
    "line) to treat such cells as missing"
)


def _column_list(value: object, what: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DataError(
            f"{what} must be a list of column names, got {value!r}"
            + (f' (write ["{value}"])' if isinstance(value, str) else "")
        )
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise DataError(f"{what}: column names must be strings, got {bad}")
    return list(value)


def _checked_options(
    path: str | os.PathLike[str],
    numeric: Sequence[str],
    categorical: Sequence[str],
    tasks: Mapping[str, TaskDefinition],
    task_kinds: Mapping[str, str] | None,
    invalid_numbers: InvalidNumbers,
    fractions: Sequence[float],
    group_column: str | None = None,
) -> tuple[Path, list[str], list[str], dict[str, str]]:
    """The file, the numeric and categorical column lists and the task-kind overrides, after
    checking the options of :func:`load_csv`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"CSV file not found: {str(path)!r}")
    numeric_cols = _column_list(numeric, "numeric")
    categorical_cols = _column_list(categorical, "categorical")
    if not isinstance(tasks, Mapping):
        raise DataError(f"tasks must map task names to definitions, got {tasks!r}")
    if not tasks:
        raise DataError("tasks must define at least one task")
    if invalid_numbers not in ("error", "missing"):
        raise DataError(f"invalid_numbers must be 'error' or 'missing', got {invalid_numbers!r}")
    kinds = dict(task_kinds or {})
    unknown = sorted(set(kinds) - set(tasks))
    if unknown:
        raise DataError(f"task_kinds names unknown tasks {unknown}; tasks are {list(tasks)}")
    bad_kinds = {k: v for k, v in kinds.items() if v not in ("binary", "regression")}
    if bad_kinds:
        raise DataError(f"task_kinds values must be 'binary' or 'regression', got {bad_kinds}")
    if len(list(fractions)) != 3:
        raise DataError(f"fractions must be (train, valid, test), got {list(fractions)}")
    if group_column is not None:
        if not isinstance(group_column, str) or not group_column.strip():
            raise DataError(f"group_column must be a column name, got {group_column!r}")
        if group_column in numeric_cols or group_column in categorical_cols:
            raise DataError(
                f"group_column {group_column!r} is also an input feature; group ids are only "
                f"used by group metrics (GAUC): remove it from numeric/categorical"
            )
    return p, numeric_cols, categorical_cols, kinds


def _task_expressions(
    p: Path, header: list[str], features: list[str], tasks: Mapping[str, TaskDefinition]
) -> dict[str, TaskExpression | None]:
    """Task name -> its parsed expression (``None`` for a callable), after checking that the
    feature and label columns are in the header and that no label column is a feature."""
    missing_cols = [c for c in features if c not in header]
    if missing_cols:
        raise DataError(f"{p}: feature columns {missing_cols} not in the header {header}")
    exprs: dict[str, TaskExpression | None] = {}
    for tname, definition in tasks.items():
        if callable(definition):
            exprs[tname] = None
            continue
        try:
            ex = parse_task_expression(definition, header)
        except ValueError as e:
            raise DataError(f"{p}: task {tname!r}: {e}") from None
        if ex.column not in header:
            raise DataError(
                f"{p}: task {tname!r}: column {ex.column!r} (from {definition!r}) is not in the "
                f"header {header}"
            )
        if ex.column in features:
            raise DataError(
                f"{p}: task {tname!r}: its label column {ex.column!r} is also an input feature "
                f"(label leakage); remove it from numeric/categorical"
            )
        exprs[tname] = ex
    return exprs


def _raw_columns(
    header: list[str],
    rows: list[list[str]],
    features: list[str],
    exprs: Mapping[str, TaskExpression | None],
    extra: Sequence[str] = (),
) -> dict[str, RawColumn]:
    """The columns the features, the tasks and ``extra`` use (every column when a task is a
    callable)."""
    used = set(features) | set(extra) | {ex.column for ex in exprs.values() if ex is not None}
    has_callable = any(ex is None for ex in exprs.values())
    keep = [c for c in header if has_callable or c in used]
    index = {c: i for i, c in enumerate(header)}
    return {c: encode_strings([r[index[c]] for r in rows]) for c in keep}


def _callable_targets(
    p: Path,
    tname: str,
    definition: Callable[[Mapping[str, np.ndarray]], Any],
    columns: Mapping[str, np.ndarray],
    n: int,
    locate: Locate,
) -> np.ndarray:
    """The ``(n,)`` float64 values a callable task definition returns for ``columns``."""
    try:
        vals = np.asarray(definition(columns), dtype=np.float64)
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"{p}: task {tname!r}: the callable failed: {err}") from err
    if vals.shape != (n,):
        raise DataError(
            f"{p}: task {tname!r}: the callable returned shape {vals.shape}, expected ({n},)"
        )
    bad = ~(np.abs(vals) <= FLOAT32_MAX)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{locate(r)}: task {tname!r}: the callable returned {vals[r]!r}, not a "
            f"finite number within the float32 range"
        )
    return vals


def _task_kind(
    p: Path,
    tname: str,
    definition: TaskDefinition,
    vals: np.ndarray,
    is_condition: bool,
    kinds: Mapping[str, str],
) -> TaskKind:
    """``"binary"`` or ``"regression"`` (``kinds`` overrides the inferred kind); a binary task
    must hold only 0/1 values and both classes."""
    is01 = bool(np.isin(vals, (0.0, 1.0)).all())
    kind = kinds.get(tname, "binary" if (is_condition or is01) else "regression")
    if kind == "binary":
        n = len(vals)
        if not is01:
            raise DataError(f"{p}: task {tname!r} is binary but has values other than 0 and 1")
        pos = int(vals.sum())
        if pos == 0 or pos == n:
            raise DataError(
                f"{p}: task {tname!r} has a single class ({'all 1' if pos else 'all 0'} in "
                f"{n} rows); check the expression {definition!r}"
            )
    return "binary" if kind == "binary" else "regression"


def _targets(
    p: Path,
    tasks: Mapping[str, TaskDefinition],
    exprs: Mapping[str, TaskExpression | None],
    kinds: Mapping[str, str],
    raw: dict[str, RawColumn],
    n: int,
    missing_values: Sequence[str],
    locate: Locate,
) -> tuple[np.ndarray, list[TaskSpec]]:
    """Targets ``(n, K)`` float32 and the task specs, in the order of ``tasks``."""
    ys, specs = [], []
    columns_view = _LazyColumns(raw)
    for tname, definition in tasks.items():
        expr = exprs[tname]
        if expr is None:
            assert callable(definition)
            vals = _callable_targets(p, tname, definition, columns_view, n, locate)
            is_condition = False
        else:
            vals, is_condition = _evaluate(tname, expr, raw[expr.column], missing_values, locate)
        kind = _task_kind(p, tname, definition, vals, is_condition, kinds)
        ys.append(vals)
        specs.append(TaskSpec(str(tname), kind))
    return np.stack(ys, axis=1).astype(np.float32), specs


def _group_ids(
    p: Path,
    header: list[str],
    raw: Mapping[str, RawColumn],
    group_column: str,
    missing_values: Sequence[str],
    locate: Locate,
) -> tuple[np.ndarray, int]:
    """The int64 group id of each row (the code of its stripped string) and the number of
    distinct groups; a missing group id is an error naming its line."""
    if group_column not in header:
        raise DataError(f"{p}: group_column {group_column!r} is not in the header {header}")
    col = raw[group_column]
    missing = np.array([v in missing_values for v in col.vocab], dtype=bool)
    r = col.first_row(missing)
    if r >= 0:
        raise DataError(
            f"{locate(r)}, column {group_column!r}: missing group id "
            f"({col.vocab[col.codes[r]]!r}); drop the row or fill in the id"
        )
    return col.codes.astype(np.int64), len(col.vocab)


def _split(
    p: Path, y: np.ndarray, specs: Sequence[TaskSpec], fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/valid/test row indices, stratified on the joint labels of the binary tasks."""
    binary_cols = [j for j, s in enumerate(specs) if s.kind == "binary"]
    try:
        tr, va, te = stratified_split(y[:, binary_cols], fractions, seed)
    except ValueError as e:
        raise DataError(f"{p}: {e}") from None
    return tr, va, te


def _numeric_features(
    raw: dict[str, RawColumn],
    numeric: list[str],
    tr: np.ndarray,
    missing_values: Sequence[str],
    invalid_numbers: InvalidNumbers,
    locate: Locate,
) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray]:
    """Standardized numeric features (``None`` without numeric columns), train mean and std."""
    if not numeric:
        return None, np.zeros(0), np.zeros(0)
    raw_num = np.stack(
        [
            numeric_values(
                raw[c],
                c,
                missing_values,
                invalid=invalid_numbers,
                locate=locate,
                invalid_hint=_INVALID_HINT,
            )  # fmt: skip
            for c in numeric
        ],
        axis=1,
    )
    x_num, mean, std = standardize(raw_num, tr, numeric, locate)
    return torch.from_numpy(x_num), mean, std


class _Columns(NamedTuple):
    """The file as :func:`load_csv` uses it: the header, the raw columns it needs, each task's
    parsed expression (``None`` for a callable), the number of data rows and their locator."""

    header: list[str]
    raw: dict[str, RawColumn]
    exprs: dict[str, TaskExpression | None]
    n: int
    locate: Locate


def _read_columns(
    p: Path,
    delimiter: str,
    encoding: str,
    features: list[str],
    tasks: Mapping[str, TaskDefinition],
    group_column: str | None,
) -> _Columns:
    """Read the file, parse the task expressions against its header and keep the raw columns
    that the features, the tasks and the group column use."""
    with gc_paused():  # one list per row: the cyclic GC would rescan them repeatedly
        header, rows, line_of = _read_rows(p, delimiter, encoding)
    locate = _row_locator(p, line_of)
    exprs = _task_expressions(p, header, features, tasks)
    raw = _raw_columns(header, rows, features, exprs, [group_column] if group_column else [])
    return _Columns(header, raw, exprs, len(rows), locate)


def _groups(
    p: Path, cols: _Columns, group_column: str | None, missing_values: Sequence[str]
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The group id tensor and its ``info`` entries (the column and the number of groups);
    ``(None, {})`` without a ``group_column``."""
    if group_column is None:
        return None, {}
    gids, num_groups = _group_ids(
        p, cols.header, cols.raw, group_column, missing_values, cols.locate
    )
    return torch.from_numpy(gids), {"group_column": group_column, "num_groups": num_groups}


def _dataset(
    cols: _Columns,
    numeric: list[str],
    categorical: list[str],
    y: np.ndarray,
    specs: list[TaskSpec],
    tr: np.ndarray,
    groups: torch.Tensor | None,
    missing_values: Sequence[str],
    invalid_numbers: InvalidNumbers,
) -> tuple[TabularDataset, dict[str, Any]]:
    """Every row as one dataset (inputs fitted on the train rows ``tr``), and the ``info``
    entries that describe its inputs: numeric mean/std and the category list of each
    categorical column."""
    x_num_t, mean, std = _numeric_features(
        cols.raw, numeric, tr, missing_values, invalid_numbers, cols.locate
    )
    x_cat, categories = category_id_matrix(cols.raw, categorical, tr, missing_values)
    x_cat_t = None if x_cat is None else torch.from_numpy(x_cat)
    schema = FeatureSchema(
        list(numeric), list(categorical), [len(categories[c]) + 1 for c in categorical]
    )
    full = TabularDataset(x_num_t, x_cat_t, torch.from_numpy(y), schema, specs, groups=groups)
    inputs = {"numeric_mean": mean.tolist(), "numeric_std": std.tolist(), "categories": categories}
    return full, inputs


def _task_descriptions(tasks: Mapping[str, TaskDefinition]) -> dict[str, str]:
    """Task name -> its expression, or the name (else the repr) of its callable."""
    return {
        k: (v if isinstance(v, str) else getattr(v, "__name__", repr(v))) for k, v in tasks.items()
    }


def load_csv(
    path: str | os.PathLike[str],
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    tasks: Mapping[str, TaskDefinition],
    task_kinds: Mapping[str, str] | None = None,
    group_column: str | None = None,
    delimiter: str = ",",
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    missing_values: Sequence[str] = DEFAULT_MISSING,
    encoding: str = "utf-8",
    invalid_numbers: InvalidNumbers = "error",
    name: str | None = None,
) -> DataSplits:
    """Load a delimited file (plain or gzipped, header row required) as a multi-task dataset.

    Args:
        path: the file.
        numeric: numeric feature columns (standardized with train statistics).
        categorical: categorical feature columns (ids fitted on train; 0 = missing/unseen).
        tasks: task name -> expression string or callable (see the module docstring); the
            order gives the target columns.
        task_kinds: optional task name -> ``"binary"`` / ``"regression"`` overrides.
        group_column: optional column of group ids (user, query...): stored as
            ``TabularDataset.groups`` for group metrics (GAUC); never an input feature. A
            missing id (a ``missing_values`` token) is an error.
        delimiter: field separator (spaces after it are skipped).
        seed: seed of the stratified split.
        fractions: train/valid/test fractions.
        missing_values: tokens meaning "missing" (after stripping whitespace).
        encoding: text encoding. With ``"utf-8"`` (the default) a leading byte-order mark is
            skipped; bytes that do not decode are an error naming the line (pass e.g.
            ``"latin-1"``).
        invalid_numbers: a numeric FEATURE cell that parses as a number but is not finite
            (``inf``, ``nan``, ``1e999``) or lies beyond the float32 range (``|x| > 3.4e38``,
            e.g. ``1e200``): ``"error"`` (default; the message names the line and the column)
            or ``"missing"`` (imputed like a missing value). Label cells are never imputed:
            such a label is always an error.
        name: dataset name (default: the file stem).

    Returns:
        :class:`DataSplits`; ``info`` records the file, the task definitions, numeric
        mean/std, the category list of each categorical column and, with a ``group_column``,
        its name and the number of groups (``num_groups``).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: (a ``ValueError``) a file that cannot be decoded, decompressed or parsed, a
            missing column, an unparsable expression, a label or group column used as a
            feature, a missing group id, a
            binary task with a single class, a non-numeric or out-of-range value in a numeric
            column, a missing or non-numeric label under a comparison. Messages name the file,
            and the line and column of a bad cell.
    """
    p, numeric, categorical, kinds = _checked_options(
        path, numeric, categorical, tasks, task_kinds, invalid_numbers, fractions, group_column
    )
    cols = _read_columns(p, delimiter, encoding, numeric + categorical, tasks, group_column)
    groups, group_info = _groups(p, cols, group_column, missing_values)
    y, specs = _targets(p, tasks, cols.exprs, kinds, cols.raw, cols.n, missing_values, cols.locate)
    tr, va, te = _split(p, y, specs, fractions, seed)
    full, inputs = _dataset(
        cols, numeric, categorical, y, specs, tr, groups, missing_values, invalid_numbers
    )
    info: dict[str, Any] = {
        "dataset": "csv",
        "file": str(p),
        "tasks": _task_descriptions(tasks),
        "seed": seed,
        "fractions": [float(f) for f in fractions],
        "num_rows": cols.n,
        "invalid_numbers": invalid_numbers,
        **inputs,
        **group_info,
    }
    return DataSplits(full.subset(tr), full.subset(va), full.subset(te), name or p.stem, info)
