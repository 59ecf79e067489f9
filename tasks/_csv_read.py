"""Reading the CSV loader's delimited text file (plain or gzipped) into a header, rows of
strings and the file line of each row, with errors that name the file and the line: bytes the
encoding cannot decode (a UTF-8 byte-order mark is skipped), a csv-module error (bad quoting, a
field over its limit), a ragged row, a corrupted gzip stream, a missing or duplicated header.
:mod:`tasks.tabular_csv` re-exports every name.
"""

from __future__ import annotations

import codecs
import csv
import io
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from ._data import DataError
from ._gzip_files import _GZIP_ERRORS, _open_binary
from ._preprocess import Locate


def _text_encoding(encoding: str) -> str:
    """``utf-8`` reads a leading byte-order mark as such (``utf-8-sig``), not as part of the
    first column name."""
    norm = encoding.strip().lower().replace("_", "-")
    return "utf-8-sig" if norm in ("utf-8", "utf8") else encoding


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


def _row_locator(p: Path, line_of: np.ndarray) -> Locate:
    """Data row index -> ``"<file>: line L (data row R)"``."""

    def locate(row: int) -> str:
        return f"{p}: line {int(line_of[row])} (data row {row + 1})"

    return locate
