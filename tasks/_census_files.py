"""Locating the Census-Income (KDD) files: the explicit path, ``$MTL_CENSUS_DIR`` or the shared
data directory, the UCI file names, and the download help that every "not found" message ends
with. :mod:`tasks.census` re-exports every name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ENV_VAR = "MTL_CENSUS_DIR"
"""Environment variable naming the directory (or file) holding the Census-Income files."""

TEST_FILES: tuple[str, ...] = ("census-income.test.gz", "census-income.test")
TRAIN_FILES: tuple[str, ...] = ("census-income.data.gz", "census-income.data")

_DOWNLOAD_HELP = (
    "Download the UCI 'Census-Income (KDD)' data set "
    "(https://archive.ics.uci.edu/dataset/117/census+income+kdd): the files "
    "census-income.test.gz (99,762 rows; enough for the default re-split protocol) and, for the "
    "canonical train/test protocol, census-income.data.gz (199,523 rows); plain uncompressed "
    "files work too. Put them in one directory and pass path=<directory> to load_census, or set "
    f"the environment variable {ENV_VAR}=<directory>; the default location is "
    "../shared/data/census-income-kdd/ next to the repository root."
)


def default_census_dir() -> Path:
    """``<repository root>/../shared/data/census-income-kdd`` (may not exist)."""
    return (
        Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "census-income-kdd"
    ).resolve()


def _find_in_dir(d: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        p = d / name
        if p.is_file():
            return p
    return None


def resolve_census_files(
    path: str | os.PathLike[str] | None = None,
    train_path: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path | None]:
    """Locate the Census-Income files.

    Args:
        path: a file (the one to re-split, or the test file when a training file is also
            given) or a directory holding ``census-income.test(.gz)`` and optionally
            ``census-income.data(.gz)``. ``None``: ``$MTL_CENSUS_DIR``, else
            :func:`default_census_dir`.
        train_path: the 199,523-row training file (overrides one found in the directory).

    Returns:
        ``(main_file, train_file)``: ``main_file`` is the test file (or the only file found);
        ``train_file`` is ``None`` when no training file is available.

    Raises:
        FileNotFoundError: nothing usable was found; the message says what to download and where.
    """
    if path is not None:
        where = Path(path).expanduser()
        origin = f"path={str(path)!r}"
    elif os.environ.get(ENV_VAR):
        where = Path(os.environ[ENV_VAR]).expanduser()
        origin = f"${ENV_VAR}={os.environ[ENV_VAR]!r}"
    else:
        where = default_census_dir()
        origin = f"the default directory {str(where)!r}"
    main: Path | None
    train: Path | None = None
    if where.is_file():
        main = where
    elif where.is_dir():
        main = _find_in_dir(where, TEST_FILES)
        train = _find_in_dir(where, TRAIN_FILES)
        if main is None and train_path is None:
            main, train = train, None
    else:
        raise FileNotFoundError(
            f"Census-Income (KDD) data not found: {origin} does not exist. {_DOWNLOAD_HELP}"
        )
    if main is None:
        raise FileNotFoundError(
            f"Census-Income (KDD) data not found in {origin}: expected one of "
            f"{', '.join(TEST_FILES + TRAIN_FILES)}. {_DOWNLOAD_HELP}"
        )
    if train_path is not None:
        train = Path(train_path).expanduser()
        if not train.is_file():
            raise FileNotFoundError(
                f"Census-Income training file not found: train_path={str(train_path)!r}. "
                f"{_DOWNLOAD_HELP}"
            )
    if train is not None and train.resolve() == main.resolve():
        train = None
    return main, train
