"""Opening data files that may be gzip-compressed: a file is read through :mod:`gzip` when it
starts with the gzip magic bytes, as plain bytes otherwise, whatever its name; the exceptions a
truncated or corrupted gzip stream raises while it is read are :data:`_GZIP_ERRORS`. Shared by
the Census-Income and the generic CSV loaders.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")
