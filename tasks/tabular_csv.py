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
overrides. A binary task with a single class is an error.

Preprocessing is the Census-Income one (:mod:`tasks._preprocess`): numeric features are
standardized with the train split's mean/std (missing values, ``""`` or ``"?"`` by default, are
imputed with the train mean, i.e. 0); categorical features get ids ``1..n`` for the categories
seen in the train split and id 0 for missing or unseen values. The split is stratified on the
joint labels of the binary tasks (:func:`tasks.stratified_split`).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import DataSplits, FeatureSchema, TabularDataset, TaskSpec, stratified_split
from ._preprocess import (
    DEFAULT_MISSING,
    RawColumn,
    category_ids,
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
        if len(rest) != 2:
            raise ValueError(f"task expression {expr!r}: expected `column OP literal`")
        value = _literal(rest[1], expr)
        op = rest[0][1]
        if op not in ("==", "!=") and isinstance(value, str):
            raise ValueError(f"task expression {expr!r}: {op} needs a number")
        return TaskExpression(column, op, (value,))
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
    inner = rest[1:-1]
    values: list[str | float] = []
    expect_value = True
    for tok in inner:
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


def _evaluate(
    task: str, ex: TaskExpression, col: RawColumn, missing: Sequence[str]
) -> tuple[np.ndarray, bool]:
    """Targets ``(N,)`` float64 and whether the expression is a 0/1 condition."""
    if ex.op is None:
        vals = numeric_values(col, ex.column, missing)
        if np.isnan(vals).any():
            raise ValueError(f"task {task!r}: column {ex.column!r} has missing values")
        return vals, False
    hit = np.zeros(len(col.vocab), dtype=bool)
    for i, s in enumerate(col.vocab):
        f = _as_float(s)
        if ex.op in ("in", "not in", "==", "!="):
            found = any(
                (isinstance(v, str) and s == v)
                or (isinstance(v, float) and f is not None and f == v)
                for v in ex.values
            )
            hit[i] = found != (ex.op in ("not in", "!="))
        else:
            if f is None:
                raise ValueError(
                    f"task {task!r}: column {ex.column!r} has the non-numeric value {s!r}, "
                    f"which cannot be compared with {ex.op} {ex.values[0]}"
                )
            v = float(ex.values[0])
            hit[i] = {">": f > v, ">=": f >= v, "<": f < v, "<=": f <= v}[ex.op]
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


def _read_rows(path: Path, delimiter: str, encoding: str) -> tuple[list[str], list[list[str]]]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if gz else open(path, "rb")
    with raw, io.TextIOWrapper(raw, encoding=encoding, newline="") as text:
        reader = csv.reader(text, delimiter=delimiter, skipinitialspace=True)
        header: list[str] | None = None
        rows: list[list[str]] = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in row]
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, the header has "
                    f"{len(header)} (delimiter {delimiter!r})"
                )
            rows.append(row)
    if header is None:
        raise ValueError(f"{path}: empty file (a header row is required)")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup or any(not h for h in header):
        raise ValueError(f"{path}: header has duplicate or empty column names: {dup or header}")
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    return header, rows


def load_csv(
    path: str | os.PathLike[str],
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    tasks: Mapping[str, TaskDefinition],
    task_kinds: Mapping[str, str] | None = None,
    delimiter: str = ",",
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    missing_values: Sequence[str] = DEFAULT_MISSING,
    encoding: str = "utf-8",
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
        delimiter: field separator (spaces after it are skipped).
        seed: seed of the stratified split.
        fractions: train/valid/test fractions.
        missing_values: tokens meaning "missing" (after stripping whitespace).
        encoding: text encoding.
        name: dataset name (default: the file stem).

    Returns:
        :class:`DataSplits`; ``info`` records the file, the task definitions, numeric
        mean/std and the category list of each categorical column.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a missing column, an unparsable expression, a label column used as a
            feature, a binary task with a single class, non-numeric values in a numeric column.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"CSV file not found: {str(path)!r}")
    if not tasks:
        raise ValueError("tasks must define at least one task")
    kinds = dict(task_kinds or {})
    unknown = sorted(set(kinds) - set(tasks))
    if unknown:
        raise ValueError(f"task_kinds names unknown tasks {unknown}; tasks are {list(tasks)}")
    bad_kinds = {k: v for k, v in kinds.items() if v not in ("binary", "regression")}
    if bad_kinds:
        raise ValueError(f"task_kinds values must be 'binary' or 'regression', got {bad_kinds}")

    with gc_paused():  # one list per row: the cyclic GC would rescan them repeatedly
        header, rows = _read_rows(p, delimiter, encoding)
    features = list(numeric) + list(categorical)
    missing_cols = [c for c in features if c not in header]
    if missing_cols:
        raise ValueError(f"{p}: feature columns {missing_cols} not in the header {header}")
    exprs: dict[str, TaskExpression | None] = {}
    for tname, definition in tasks.items():
        if callable(definition):
            exprs[tname] = None
            continue
        ex = parse_task_expression(definition, header)
        if ex.column not in header:
            raise ValueError(
                f"task {tname!r}: column {ex.column!r} (from {definition!r}) is not in the "
                f"header {header}"
            )
        if ex.column in features:
            raise ValueError(
                f"task {tname!r}: its label column {ex.column!r} is also an input feature "
                f"(label leakage); remove it from numeric/categorical"
            )
        exprs[tname] = ex

    used = set(features) | {ex.column for ex in exprs.values() if ex is not None}
    has_callable = any(ex is None for ex in exprs.values())
    keep = [c for c in header if has_callable or c in used]
    index = {c: i for i, c in enumerate(header)}
    raw = {c: encode_strings([r[index[c]] for r in rows]) for c in keep}
    n = len(rows)
    del rows

    ys, specs = [], []
    columns_view = _LazyColumns(raw)
    for tname, definition in tasks.items():
        ex = exprs[tname]
        if ex is None:
            assert callable(definition)
            try:
                vals = np.asarray(definition(columns_view), dtype=np.float64)
            except (KeyError, ValueError, TypeError) as err:
                raise ValueError(f"task {tname!r}: the callable failed: {err}") from err
            if vals.shape != (n,):
                raise ValueError(
                    f"task {tname!r}: the callable returned shape {vals.shape}, expected ({n},)"
                )
            is_condition = False
        else:
            vals, is_condition = _evaluate(tname, ex, raw[ex.column], missing_values)
        if not np.isfinite(vals).all():
            raise ValueError(f"task {tname!r}: non-finite target values")
        is01 = bool(np.isin(vals, (0.0, 1.0)).all())
        kind = kinds.get(tname, "binary" if (is_condition or is01) else "regression")
        if kind == "binary":
            if not is01:
                raise ValueError(f"task {tname!r} is binary but has values other than 0 and 1")
            pos = int(vals.sum())
            if pos == 0 or pos == n:
                raise ValueError(
                    f"task {tname!r} has a single class ({'all 1' if pos else 'all 0'} in {n} "
                    f"rows); check the expression {tasks[tname]!r}"
                )
        ys.append(vals)
        specs.append(TaskSpec(str(tname), kind))  # type: ignore[arg-type]
    y = np.stack(ys, axis=1).astype(np.float32)

    binary_cols = [j for j, s in enumerate(specs) if s.kind == "binary"]
    if len(list(fractions)) != 3:
        raise ValueError(f"fractions must be (train, valid, test), got {list(fractions)}")
    tr, va, te = stratified_split(y[:, binary_cols], fractions, seed)

    x_num_t = None
    mean = std = np.zeros(0)
    if numeric:
        raw_num = np.stack([numeric_values(raw[c], c, missing_values) for c in numeric], axis=1)
        x_num, mean, std = standardize(raw_num, tr)
        x_num_t = torch.from_numpy(x_num)
    categories: dict[str, list[str]] = {}
    x_cat_t = None
    if categorical:
        ids = []
        for c in categorical:
            col_ids, cats = category_ids(raw[c], tr, missing_values)
            ids.append(col_ids)
            categories[c] = cats
        x_cat_t = torch.from_numpy(np.stack(ids, axis=1))
    schema = FeatureSchema(
        list(numeric), list(categorical), [len(categories[c]) + 1 for c in categorical]
    )
    full = TabularDataset(x_num_t, x_cat_t, torch.from_numpy(y), schema, specs)
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
        "numeric_mean": mean.tolist(),
        "numeric_std": std.tolist(),
        "categories": categories,
    }
    return DataSplits(full.subset(tr), full.subset(va), full.subset(te), name or p.stem, info)
