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
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import os
import re
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import (
    DataError,
    DataSplits,
    FeatureSchema,
    TabularDataset,
    TaskKind,
    TaskSpec,
    stratified_split,
)
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

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<bq>`[^`]+`)
    | (?P<op>==|!=|>=|<=|>|<)
    | (?P<punct>[(),])
    | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_COMPARISONS = ("==", "!=", ">", ">=", "<", "<=")


@dataclass(frozen=True)
class TaskExpression:
    """A parsed task expression: ``column``, an operator (``None`` for a bare column,
    a comparison, ``"in"`` or ``"not in"``) and its literal values (``str`` or ``float``)."""

    column: str
    op: str | None = None
    values: tuple[str | float, ...] = ()


def _tokenize(expr: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    text = expr.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(
                f"cannot parse task expression {expr!r} at position {pos}: {text[pos:]!r}"
            )
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _literal(tok: tuple[str, str], expr: str) -> str | float:
    kind, text = tok
    if kind == "num":
        return float(text)
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    raise ValueError(
        f"task expression {expr!r}: expected a quoted string or a number, got {text!r}"
    )


def parse_task_expression(expr: str, columns: Sequence[str] = ()) -> TaskExpression:
    """Parse ``"col OP literal"``, ``"col [not] in (lit, ...)"`` or a bare column name.

    A string equal to one of ``columns`` (the header) is a bare column even if it is not an
    identifier.

    Raises:
        ValueError: the expression does not follow the grammar (the message shows where).
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"task expression must be a non-empty string, got {expr!r}")
    if expr.strip() in columns:
        return TaskExpression(expr.strip())
    toks = _tokenize(expr)
    if not toks:
        raise ValueError(f"empty task expression {expr!r}")
    kind, text = toks[0]
    if kind == "name":
        column = text
    elif kind == "bq":
        column = text[1:-1]
    else:
        raise ValueError(f"task expression {expr!r} must start with a column name, got {text!r}")
    rest = toks[1:]
    if not rest:
        return TaskExpression(column)
    if rest[0][0] == "op":
        return _comparison(column, rest, expr)
    return _membership(column, rest, expr)


def _comparison(column: str, rest: list[tuple[str, str]], expr: str) -> TaskExpression:
    """``column OP literal`` (``rest`` = the tokens after the column)."""
    if len(rest) != 2:
        raise ValueError(f"task expression {expr!r}: expected `column OP literal`")
    value = _literal(rest[1], expr)
    op = rest[0][1]
    if op not in ("==", "!=") and isinstance(value, str):
        raise ValueError(f"task expression {expr!r}: {op} needs a number")
    return TaskExpression(column, op, (value,))


def _membership(column: str, rest: list[tuple[str, str]], expr: str) -> TaskExpression:
    """``column [not] in (lit, ...)`` (``rest`` = the tokens after the column)."""
    words = [t[1] for t in rest[:2]]
    if words[:1] == ["in"]:
        op, rest = "in", rest[1:]
    elif words == ["not", "in"]:
        op, rest = "not in", rest[2:]
    else:
        raise ValueError(
            f"task expression {expr!r}: expected ==, !=, >, >=, <, <=, 'in' or 'not in' after "
            f"the column name"
        )
    if len(rest) < 3 or rest[0] != ("punct", "(") or rest[-1] != ("punct", ")"):
        raise ValueError(f"task expression {expr!r}: expected a parenthesized list after {op!r}")
    values: list[str | float] = []
    expect_value = True
    for tok in rest[1:-1]:
        if expect_value:
            values.append(_literal(tok, expr))
        elif tok != ("punct", ","):
            raise ValueError(f"task expression {expr!r}: expected ',' between list values")
        expect_value = not expect_value
    if not values:
        raise ValueError(f"task expression {expr!r}: empty list")
    return TaskExpression(column, op, tuple(values))


def _as_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v


def _describe(ex: TaskExpression) -> str:
    """The operator and literal(s) of ``ex`` as written, e.g. ``"> 0"``, ``"in (1, 'a')"``."""
    lits = [f"{v:g}" if isinstance(v, float) else repr(v) for v in ex.values]
    if ex.op in ("in", "not in"):
        return f"{ex.op} ({', '.join(lits)})"
    return f"{ex.op} {lits[0]}"


def _evaluate(
    task: str, ex: TaskExpression, col: RawColumn, missing: Sequence[str], locate: Locate
) -> tuple[np.ndarray, bool]:
    """Targets ``(N,)`` float64 and whether the expression is a 0/1 condition.

    Raises:
        DataError: a bare label column with a missing, non-numeric or non-finite cell, an
            ordering comparison (``> >= < <=``) on a cell that is not a number (``nan``, a
            missing token, text), or a ``nan`` cell compared with a number by ``== != in``;
            the message names the line and the column.
    """
    if ex.op is None:
        # a label cannot be imputed: out-of-range cells are always an error
        vals = numeric_values(col, ex.column, missing, invalid="error", locate=locate)
        nan = np.isnan(vals)
        if nan.any():
            r = int(np.flatnonzero(nan)[0])
            raise DataError(
                f"{locate(r)}, column {ex.column!r}: task {task!r} has a missing label "
                f"({col.vocab[col.codes[r]]!r}); drop the row or fill in the value"
            )
        return vals, False
    hit = np.zeros(len(col.vocab), dtype=bool)
    not_number = np.zeros(len(col.vocab), dtype=bool)
    numeric_literal = any(isinstance(v, float) for v in ex.values)
    for i, s in enumerate(col.vocab):
        f = _as_float(s)
        if ex.op in ("in", "not in", "==", "!="):
            if numeric_literal and f is not None and np.isnan(f) and s not in ex.values:
                not_number[i] = True  # a NaN label is neither equal nor unequal to a number
                continue
            found = any(
                (isinstance(v, str) and s == v)
                or (isinstance(v, float) and f is not None and f == v)
                for v in ex.values
            )
            hit[i] = found != (ex.op in ("not in", "!="))
        elif f is None or np.isnan(f):
            not_number[i] = True
        else:
            v = float(ex.values[0])
            hit[i] = {">": f > v, ">=": f >= v, "<": f < v, "<=": f <= v}[ex.op]
    if not_number.any():
        r = col.first_row(not_number)
        s = col.vocab[col.codes[r]]
        if s in missing:
            what = f"the missing-value token {s!r}"
        elif _as_float(s) is None:
            what = f"the non-numeric value {s!r}"
        else:
            what = f"the value {s!r} (not a number)"
        raise DataError(
            f"{locate(r)}, column {ex.column!r}: task {task!r} has {what}, for which "
            f"`{ex.column} {_describe(ex)}` is neither true nor false; drop the row or fill in "
            f"the label"
        )
    return (hit[col.codes] if len(col.vocab) else np.zeros(len(col), bool)).astype(np.float64), True


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


_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
_INVALID_HINT = (
    ", or pass invalid_numbers='missing' (--set data.invalid_numbers=missing on the command "
    "line) to treat such cells as missing"
)


def _text_encoding(encoding: str) -> str:
    """``utf-8`` reads a leading byte-order mark as such (``utf-8-sig``), not as part of the
    first column name."""
    norm = encoding.strip().lower().replace("_", "-")
    return "utf-8-sig" if norm in ("utf-8", "utf8") else encoding


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _undecodable_line(path: Path, encoding: str) -> tuple[int, int, str] | None:
    """``(line, column, reason)`` of the first line that ``encoding`` cannot decode."""
    codec = codecs.lookup(encoding)
    with _open_binary(path) as raw:
        for line_no, line in enumerate(raw, start=1):
            try:
                codec.decode(line)
            except UnicodeDecodeError as e:
                return line_no, int(e.start) + 1, str(e.reason)
    return None


def _decode_error(
    path: Path, encoding: str, text_encoding: str, err: UnicodeDecodeError
) -> DataError:
    try:
        where = _undecodable_line(path, text_encoding)
    except (OSError, *_GZIP_ERRORS):  # pragma: no cover - the file changed under us
        where = None
    bad = err.object[err.start : err.start + 1]
    if where is None:  # pragma: no cover - an error that only shows across lines
        loc = f"{path}"
    else:
        loc = f"{path}: line {where[0]}, byte {where[1]} of the line"
    return DataError(
        f"{loc}: the file is not valid {encoding} (byte {bad!r}: {err.reason}); pass the file's "
        f"encoding, e.g. encoding='latin-1' (data.encoding=latin-1 on the command line)"
    )


def _read_rows(
    path: Path, delimiter: str, encoding: str
) -> tuple[list[str], list[list[str]], np.ndarray]:
    """Header, data rows and the file line of each data row (where the row ends)."""
    text_encoding = _text_encoding(encoding)
    try:
        codecs.lookup(text_encoding)
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines = array("q")
    line_num = 0
    reader: Any = None
    try:
        with (
            _open_binary(path) as raw,
            io.TextIOWrapper(raw, encoding=text_encoding, newline="") as text,
        ):
            reader = csv.reader(text, delimiter=delimiter, skipinitialspace=True)
            for row in reader:
                line_num = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, the header has "
                        f"{len(header)} (delimiter {delimiter!r})"
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise _decode_error(path, encoding, text_encoding, e) from None
    except csv.Error as e:
        line = reader.line_num if reader is not None else line_num + 1
        hint = (
            "a field longer than the csv module's limit: check the delimiter and the quoting (an "
            "unclosed quote swallows the rest of the file)"
            if "field limit" in str(e)
            else f"check the delimiter {delimiter!r} and the quoting"
        )
        raise DataError(f"{path}: line {line}: {e}; {hint}") from None
    except _GZIP_ERRORS as e:
        raise DataError(
            f"{path}: cannot decompress the gzip data ({type(e).__name__}: {e}); the file is "
            f"truncated or corrupted"
        ) from None
    if header is None:
        raise DataError(f"{path}: empty file (a header row is required)")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup or any(not h for h in header):
        raise DataError(f"{path}: header has duplicate or empty column names: {dup or header}")
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return header, rows, np.frombuffer(lines, dtype=np.int64)


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


def _row_locator(p: Path, line_of: np.ndarray) -> Locate:
    """Data row index -> ``"<file>: line L (data row R)"``."""

    def locate(row: int) -> str:
        return f"{p}: line {int(line_of[row])} (data row {row + 1})"

    return locate


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
    with gc_paused():  # one list per row: the cyclic GC would rescan them repeatedly
        header, rows, line_of = _read_rows(p, delimiter, encoding)
    locate = _row_locator(p, line_of)
    features = numeric + categorical
    exprs = _task_expressions(p, header, features, tasks)
    raw = _raw_columns(header, rows, features, exprs, [group_column] if group_column else [])
    n = len(rows)
    del rows
    groups: torch.Tensor | None = None
    num_groups = 0
    if group_column is not None:
        gids, num_groups = _group_ids(p, header, raw, group_column, missing_values, locate)
        groups = torch.from_numpy(gids)

    y, specs = _targets(p, tasks, exprs, kinds, raw, n, missing_values, locate)
    tr, va, te = _split(p, y, specs, fractions, seed)
    x_num_t, mean, std = _numeric_features(
        raw, numeric, tr, missing_values, invalid_numbers, locate
    )
    x_cat, categories = category_id_matrix(raw, categorical, tr, missing_values)
    x_cat_t = None if x_cat is None else torch.from_numpy(x_cat)
    schema = FeatureSchema(
        list(numeric), list(categorical), [len(categories[c]) + 1 for c in categorical]
    )
    full = TabularDataset(x_num_t, x_cat_t, torch.from_numpy(y), schema, specs, groups=groups)
    info: dict[str, Any] = {
        "dataset": "csv",
        "file": str(p),
        "tasks": {
            k: (v if isinstance(v, str) else getattr(v, "__name__", repr(v)))
            for k, v in tasks.items()
        },
        "seed": seed,
        "fractions": [float(f) for f in fractions],
        "num_rows": n,
        "invalid_numbers": invalid_numbers,
        "numeric_mean": mean.tolist(),
        "numeric_std": std.tolist(),
        "categories": categories,
    }
    if group_column is not None:
        info["group_column"] = group_column
        info["num_groups"] = num_groups
    return DataSplits(full.subset(tr), full.subset(va), full.subset(te), name or p.stem, info)
