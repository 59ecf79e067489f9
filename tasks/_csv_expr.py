"""Task expressions of the CSV loader: the small grammar of ``"col OP literal"``,
``"col [not] in (lit, ...)"`` and bare column names, tokenized by a regular expression and
parsed into a :class:`TaskExpression` (never ``eval``), and its evaluation over one raw column
into targets, with the errors that name the line and column of a cell for which the expression
has no truth value. :mod:`tasks.tabular_csv` re-exports every name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._data import DataError
from ._preprocess import Locate, RawColumn, numeric_values

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
