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
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ._data import (
    DataError,
    DataSplits,
    FeatureSchema,
    TabularDataset,
    TaskSpec,
    stratified_split,
)
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

CENSUS_COLUMNS: tuple[str, ...] = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin",
    "sex", "union_member", "unemp_reason", "full_or_part_emp", "capital_gains",
    "capital_losses", "stock_dividends", "tax_filer_stat", "region_prev_res", "state_prev_res",
    "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa", "mig_chg_reg",
    "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18",
    "country_father", "country_mother", "country_self", "citizenship", "own_or_self",
    "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)  # fmt: skip
"""The 42 fields of the UCI files, in file order."""

NUMERIC_COLUMNS: tuple[str, ...] = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
    "weeks_worked",
)  # fmt: skip
"""The continuous columns (numeric features); every other input column is categorical."""

LOG_COLUMNS: tuple[str, ...] = (
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
)
"""Heavy-tailed money columns transformed with ``sign(x) * log1p(|x|)`` when ``log_money``."""

EDUCATION_POSITIVE: frozenset[str] = frozenset(
    {
        "Associates degree-academic program",
        "Associates degree-occup /vocational",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Doctorate degree(PhD EdD)",
    }
)
"""``education`` values (stripped, exactly as in the file) counted as "associate degree or higher"."""

INCOME_POSITIVE = "50000+."
INCOME_NEGATIVE = "- 50000."
NEVER_MARRIED = "Never married"

_TASK_DROPS = {
    "income": ("income_50k",),
    "never_married": ("marital_stat",),
    "education": ("education", "hs_college"),
    "weeks_worked": ("weeks_worked", "num_emp"),
    "has_capital_gains": ("capital_gains",),
}
_REGRESSION_TASKS = frozenset({"weeks_worked"})
_ALWAYS_DROPPED = ("instance_weight", "income_50k")

CENSUS_GROUPS: dict[int | str, tuple[str, ...]] = {
    1: ("income", "never_married"),
    2: ("education", "never_married"),
    3: ("income", "never_married", "education"),
    "mixed": ("income", "never_married", "weeks_worked"),
    "mixed_sparse": ("has_capital_gains", "never_married", "weeks_worked"),
}
"""Task groups: 1 and 2 from the MMoE paper, 3 the natural 3-task variant, and the mixed-scale
groups (two binary tasks and a raw-unit regression; ``mixed_sparse`` with a 3.7 % positive task)."""

_GROUP_ALIASES: dict[str, int | str] = {
    "1": 1, "group1": 1, "income-marital": 1, "income_marital": 1,
    "2": 2, "group2": 2, "education-marital": 2, "education_marital": 2,
    "3": 3, "group3": 3, "3task": 3, "3-task": 3, "3tasks": 3,
    "mixed": "mixed", "mixed-sparse": "mixed_sparse", "mixed_sparse": "mixed_sparse",
}  # fmt: skip

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

_NUM_FIELDS = len(CENSUS_COLUMNS)
_CHUNK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------- files
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


# ---------------------------------------------------------------------------------- parsing
def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


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
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
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
def _group_label(g: int | str) -> str:
    return f"group{g}" if isinstance(g, int) else g


def _resolve_group(group: int | str | Sequence[str]) -> tuple[tuple[str, ...], str]:
    if isinstance(group, bool):
        raise ValueError(
            f"group must be 1, 2, 3, 'mixed', 'mixed_sparse' or a sequence of task names, "
            f"got {group!r}"
        )
    if isinstance(group, int):
        if group not in CENSUS_GROUPS:
            raise ValueError(
                f"unknown Census-Income group {group!r}; choose 1, 2, 3, 'mixed' or 'mixed_sparse'"
            )
        return CENSUS_GROUPS[group], f"group{group}"
    if isinstance(group, str):
        key = group.strip().lower()
        if key not in _GROUP_ALIASES:
            raise ValueError(
                f"unknown Census-Income group {group!r}; choose 1, 2, 3, 'mixed', 'mixed_sparse' "
                f"(or one of {sorted(_GROUP_ALIASES)}) or a sequence of task names from "
                f"{sorted(_TASK_DROPS)}"
            )
        g = _GROUP_ALIASES[key]
        return CENSUS_GROUPS[g], _group_label(g)
    names = tuple(str(t) for t in group)
    unknown = [t for t in names if t not in _TASK_DROPS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"invalid Census-Income task list {list(names)}: use distinct names from "
            f"{sorted(_TASK_DROPS)}"
        )
    for g, tasks in CENSUS_GROUPS.items():
        if tasks == names:
            return names, _group_label(g)
    return names, "+".join(names)


def _label(table: dict[str, RawColumn], task: str, locate: Locate | None) -> np.ndarray:
    """One target column: 0/1 for the binary tasks, raw units for ``weeks_worked``."""
    if task == "income":
        return table["income_50k"].mask([INCOME_POSITIVE])
    if task == "never_married":
        return table["marital_stat"].mask([NEVER_MARRIED])
    if task == "education":
        return table["education"].mask(EDUCATION_POSITIVE)
    if task == "has_capital_gains":
        return numeric_values(table["capital_gains"], "capital_gains", locate=locate) > 0
    return numeric_values(table[task], task, locate=locate)


def _labels(
    table: dict[str, RawColumn], tasks: Sequence[str], locate: Locate | None = None
) -> np.ndarray:
    cols = [np.asarray(_label(table, t, locate), dtype=np.float64) for t in tasks]
    return np.stack(cols, axis=1).astype(np.float32)


def _strata(y: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
    """The binary label columns, which the stratified split keeps balanced."""
    keep = [j for j, t in enumerate(tasks) if t not in _REGRESSION_TASKS]
    return y[:, keep]


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


def _input_columns(
    task_names: Sequence[str], drop_columns: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """``(dropped, numeric, categorical)`` column lists."""
    dropped = list(_ALWAYS_DROPPED)
    for t in task_names:
        dropped += [c for c in _TASK_DROPS[t] if c not in dropped]
    dropped += [c for c in drop_columns if c not in dropped]
    inputs = [c for c in CENSUS_COLUMNS if c not in dropped]
    num_cols = [c for c in inputs if c in NUMERIC_COLUMNS]
    cat_cols = [c for c in inputs if c not in NUMERIC_COLUMNS]
    return dropped, num_cols, cat_cols


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
    main_file, train_file = resolve_census_files(path, train_path)
    if protocol == "canonical" and train_file is None:
        raise FileNotFoundError(
            "protocol='canonical' needs the UCI training file census-income.data(.gz) next to "
            f"{main_file} or given as train_path. {_DOWNLOAD_HELP}"
        )
    use_canonical = train_file is not None and protocol != "resplit"
    rng = np.random.default_rng(seed)
    if use_canonical:
        assert train_file is not None
        loaded = _canonical_table(
            train_file, main_file, task_names, seed, valid_fraction, max_rows, subsample, rng
        )
    else:
        loaded = _resplit_table(main_file, task_names, seed, fractions, max_rows, subsample, rng)
    table, y, (tr, va, te), files, locate = loaded

    dropped, num_cols, cat_cols = _input_columns(task_names, drop_columns)
    x_num_t, mean, std = _numeric_features(table, num_cols, log_money, tr, locate)
    x_cat, categories = category_id_matrix(table, cat_cols, tr)
    x_cat_t = None if x_cat is None else torch.from_numpy(x_cat)
    schema = FeatureSchema(num_cols, cat_cols, [len(categories[c]) + 1 for c in cat_cols])
    specs = [TaskSpec(t, "regression" if t in _REGRESSION_TASKS else "binary") for t in task_names]
    full = TabularDataset(x_num_t, x_cat_t, torch.from_numpy(y), schema, specs)

    info: dict[str, Any] = {
        "dataset": "census-income-kdd",
        "group": group_label,
        "tasks": list(task_names),
        "protocol": "canonical" if use_canonical else "resplit",
        "files": files,
        "seed": seed,
        "fractions": [float(f) for f in fractions] if not use_canonical else None,
        "valid_fraction": float(valid_fraction) if use_canonical else None,
        "max_rows": max_rows,
        "subsample": subsample,
        "num_rows": int(y.shape[0]),
        "dropped_columns": dropped,
        "log_money": bool(log_money),
        "log_columns": [c for c in num_cols if c in LOG_COLUMNS] if log_money else [],
        "numeric_mean": mean.tolist(),
        "numeric_std": std.tolist(),
        "categories": categories,
        "note": (
            "re-split of the UCI test file (4x less training data than the paper): numbers "
            "are not comparable with published results"
            if not use_canonical
            else "canonical UCI train/test protocol"
        ),
    }
    return DataSplits(
        full.subset(tr), full.subset(va), full.subset(te), f"census-income/{group_label}", info
    )
