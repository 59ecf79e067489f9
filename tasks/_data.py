"""Dataset abstraction shared by every task family: task specs, feature schemas, tensors, splits.

Everything here is plain tensors held in memory. A :class:`TabularDataset` stores the whole table
as three tensors (numeric features, categorical ids, targets), plus optional group ids (user or
query, for group metrics such as GAUC; never a model input), and iterates over mini-batches by
slicing them with index tensors, so an epoch costs a few tensor gathers, not a Python loop over
rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mtl.models import Features

__all__ = [
    "DataError",
    "TaskKind",
    "TaskSpec",
    "FeatureSchema",
    "TabularDataset",
    "DataSplits",
    "stratified_split",
    "label_correlation",
]


class DataError(ValueError):
    """Bad input data or loader options: a file that cannot be read or parsed, a bad cell, an
    unknown or missing option. The message names the file (and the line, data row and column
    where there is one). A :class:`ValueError`, so ``except ValueError`` still catches it."""


TaskKind = Literal["binary", "regression"]
_KINDS: tuple[str, ...] = ("binary", "regression")

IndexLike = Tensor | np.ndarray | Sequence[int] | slice


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task.

    Attributes:
        name: task name, unique within a dataset (used in tables and plots).
        kind: ``"binary"`` (targets in {0, 1}; the model outputs a logit, trained with
            binary cross-entropy) or ``"regression"`` (real targets; mean squared error).
    """

    name: str
    kind: TaskKind

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TaskSpec.name must be a non-empty string, got {self.name!r}")
        if self.kind not in _KINDS:
            raise ValueError(
                f"TaskSpec.kind must be one of {_KINDS}, got {self.kind!r} for task {self.name!r}"
            )


@dataclass(frozen=True)
class FeatureSchema:
    """Names and sizes of the input columns.

    Attributes:
        numeric: names of the numeric columns, in the order of ``x_num``'s columns.
        categorical: names of the categorical columns, in the order of ``x_cat``'s columns.
        cardinalities: number of ids of each categorical column; ids lie in
            ``[0, cardinality)``, id 0 being reserved for missing/unseen values.
    """

    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    cardinalities: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numeric", [str(c) for c in self.numeric])
        object.__setattr__(self, "categorical", [str(c) for c in self.categorical])
        object.__setattr__(self, "cardinalities", [int(c) for c in self.cardinalities])
        if len(self.categorical) != len(self.cardinalities):
            raise ValueError(
                f"FeatureSchema: {len(self.categorical)} categorical columns but "
                f"{len(self.cardinalities)} cardinalities"
            )
        bad = [(n, c) for n, c in zip(self.categorical, self.cardinalities) if c < 1]
        if bad:
            raise ValueError(f"FeatureSchema: cardinalities must be >= 1, got {bad}")
        names = self.numeric + self.categorical
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"FeatureSchema: duplicate column names {dup}")

    @property
    def num_numeric(self) -> int:
        """Number of numeric columns."""
        return len(self.numeric)

    @property
    def num_categorical(self) -> int:
        """Number of categorical columns."""
        return len(self.categorical)


def _as_index(indices: IndexLike, n: int) -> Tensor | slice:
    """Normalize row indices (int sequence/array/tensor, bool mask, or slice) to a tensor/slice."""
    if isinstance(indices, slice):
        return indices
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"boolean mask must have shape ({n},), got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
    idx = idx.to(torch.long).flatten()
    if int(idx.min()) < -n or int(idx.max()) >= n:
        raise IndexError(f"row index out of range for a dataset of {n} rows")
    return idx


def _check_features(
    x: Tensor | None, n: int, width: int, name: str, width_name: str, kind: str
) -> None:
    """``x`` is ``(n, width)``, or ``None`` when the schema lists no column of this kind."""
    if x is None:
        if width:
            raise ValueError(f"schema lists {width} {kind} columns but {name} is None")
    elif x.dim() != 2 or x.shape != (n, width):
        raise ValueError(
            f"{name} must have shape (N={n}, {width_name}={width}), got {tuple(x.shape)}"
        )


def _check_category_ids(x_cat: Tensor, schema: FeatureSchema) -> None:
    """Every categorical id lies in ``[0, cardinality)`` of its column."""
    lo = x_cat.amin(0)
    hi = x_cat.amax(0)
    card = torch.tensor(schema.cardinalities, dtype=torch.int64)
    bad = ((lo < 0) | (hi >= card)).nonzero().flatten().tolist()
    if bad:
        j = bad[0]
        raise ValueError(
            f"categorical column {schema.categorical[j]!r} has ids in "
            f"[{int(lo[j])}, {int(hi[j])}] outside [0, {schema.cardinalities[j]})"
        )


class TabularDataset:
    """An in-memory multi-task table: features plus K targets.

    Args:
        x_num: float32 tensor ``(N, n_num)`` of numeric features, or ``None``.
        x_cat: int64 tensor ``(N, n_cat)`` of category ids (``0 <= id < cardinality``), or ``None``.
        y: float32 tensor ``(N, K)`` of targets (``(N,)`` is accepted when K = 1).
        schema: the :class:`FeatureSchema` describing the columns.
        tasks: the K :class:`TaskSpec`; binary targets must lie in {0, 1}.
        groups: optional int64 tensor ``(N,)`` of group ids (the user or query of each row), used
            by group metrics (:func:`mtl.metrics.gauc`) and never fed to a model; it stays on
            the CPU (:meth:`to` does not move it). ``None`` (default): no groups.

    Raises:
        ValueError: on any shape, dtype-range or schema mismatch (the message names it).
    """

    def __init__(
        self,
        x_num: Tensor | None,
        x_cat: Tensor | None,
        y: Tensor,
        schema: FeatureSchema,
        tasks: Sequence[TaskSpec],
        *,
        groups: Tensor | None = None,
        _validate: bool = True,
    ) -> None:
        self.tasks: list[TaskSpec] = list(tasks)
        self.schema = schema
        self.groups: Tensor | None = groups
        if not _validate:
            self.x_num, self.x_cat, self.y = x_num, x_cat, y
            return
        if x_num is not None:
            x_num = torch.as_tensor(x_num).to(torch.float32)
        if x_cat is not None:
            x_cat = torch.as_tensor(x_cat)
            if x_cat.is_floating_point():
                raise ValueError(f"x_cat must hold integer ids, got dtype {x_cat.dtype}")
            x_cat = x_cat.to(torch.int64)
        y = torch.as_tensor(y).to(torch.float32)
        if groups is not None:
            groups = torch.as_tensor(groups)
            if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
                raise ValueError(f"groups must hold integer ids, got dtype {groups.dtype}")
            self.groups = groups.to("cpu", torch.int64)
        self.x_num, self.x_cat, self.y = x_num, x_cat, y
        self._validate()

    def _validate(self) -> None:
        schema = self.schema
        if not isinstance(schema, FeatureSchema):
            raise TypeError(f"schema must be a FeatureSchema, got {type(schema).__name__}")
        self._validate_tasks()
        n = self.y.shape[0]
        if self.x_num is None and self.x_cat is None:
            raise ValueError("a dataset needs numeric or categorical features (both are None)")
        _check_features(self.x_num, n, schema.num_numeric, "x_num", "n_num", "numeric")
        _check_features(self.x_cat, n, schema.num_categorical, "x_cat", "n_cat", "categorical")
        if self.x_cat is not None and n and schema.num_categorical:
            _check_category_ids(self.x_cat, schema)
        if self.groups is not None and tuple(self.groups.shape) != (n,):
            raise ValueError(f"groups must have shape (N={n},), got {tuple(self.groups.shape)}")
        self._validate_targets()

    def _validate_tasks(self) -> None:
        """The task list and the ``(N, K)`` target matrix (a 1-D ``y`` with one task is
        reshaped)."""
        if not self.tasks or not all(isinstance(t, TaskSpec) for t in self.tasks):
            raise ValueError("tasks must be a non-empty sequence of TaskSpec")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names: {names}")
        k = len(self.tasks)
        if self.y.dim() == 1 and k == 1:
            self.y = self.y.unsqueeze(1)
        if self.y.dim() != 2:
            raise ValueError(f"y must have shape (N, K), got {tuple(self.y.shape)}")
        if self.y.shape[1] != k:
            raise ValueError(f"y has {self.y.shape[1]} target columns but {k} tasks were given")

    def _validate_targets(self) -> None:
        """Finite targets; 0/1 for binary tasks."""
        y, n = self.y, self.y.shape[0]
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains non-finite values")
        for j, t in enumerate(self.tasks):
            if t.kind == "binary" and n and not bool(((y[:, j] == 0) | (y[:, j] == 1)).all()):
                raise ValueError(f"binary task {t.name!r} has targets outside {{0, 1}}")

    # ------------------------------------------------------------------ accessors
    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"TabularDataset(n={len(self)}, numeric={self.schema.num_numeric}, "
            f"categorical={self.schema.num_categorical}, tasks={self.task_names})"
        )

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        """The task names, in target-column order."""
        return [t.name for t in self.tasks]

    @property
    def features(self) -> Features:
        """All rows as one :class:`mtl.models.Features` (no copy)."""
        return Features(self.x_num, self.x_cat)

    @property
    def targets(self) -> tuple[Tensor, ...]:
        """The K target vectors, each of shape ``(N,)`` (contiguous float32)."""
        return tuple(self.y.t().contiguous().unbind(0))

    def subset(self, indices: IndexLike) -> TabularDataset:
        """Rows ``indices`` (ints, bool mask or slice) as a new dataset with the same schema
        (and the group ids of those rows)."""
        idx = _as_index(indices, len(self))

        def take(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if isinstance(idx, slice):
                return t[idx]
            return t.index_select(0, idx.to(t.device) % len(self))

        y = take(self.y)
        assert y is not None
        return TabularDataset(
            take(self.x_num),
            take(self.x_cat),
            y,
            self.schema,
            self.tasks,
            groups=take(self.groups),
            _validate=False,
        )

    def to(self, device: torch.device | str) -> TabularDataset:
        """A copy of the dataset on ``device`` (the group ids stay on the CPU)."""
        return TabularDataset(
            None if self.x_num is None else self.x_num.to(device),
            None if self.x_cat is None else self.x_cat.to(device),
            self.y.to(device),
            self.schema,
            self.tasks,
            groups=self.groups,
            _validate=False,
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Features, tuple[Tensor, ...]]]:
        """Iterate once over the rows in mini-batches.

        Args:
            batch_size: rows per batch (the last batch is smaller unless ``drop_last``).
            shuffle: visit the rows in a random order (``torch.randperm`` with ``generator``;
                pass a seeded generator for reproducible epochs).
            generator: the random generator used when shuffling.
            drop_last: skip the final incomplete batch.

        Yields:
            ``(features, targets)``: a :class:`Features` of B rows and a tuple of K float32
            tensors of shape ``(B,)``.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
        n = len(self)
        yt = self.y.t()  # (K, N) view; gathering columns of it gives contiguous per-task rows
        perm = torch.randperm(n, generator=generator, device=self.y.device) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if perm is None:
                xn = None if self.x_num is None else self.x_num[start:end]
                xc = None if self.x_cat is None else self.x_cat[start:end]
                ys = yt[:, start:end].contiguous()
            else:
                idx = perm[start:end]
                xn = None if self.x_num is None else self.x_num.index_select(0, idx)
                xc = None if self.x_cat is None else self.x_cat.index_select(0, idx)
                ys = yt.index_select(1, idx)
            yield Features(xn, xc), tuple(ys.unbind(0))

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)


def _label_stats(ds: TabularDataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for j, t in enumerate(ds.tasks):
        col = ds.y[:, j].double()
        if t.kind == "binary":
            out[t.name] = float(col.mean()) if len(ds) else float("nan")
        else:
            out[t.name] = {
                "mean": float(col.mean()) if len(ds) else float("nan"),
                "std": float(col.std()) if len(ds) > 1 else float("nan"),
            }
    return out


def label_correlation(y: Tensor | np.ndarray) -> np.ndarray:
    """Pearson correlation matrix ``(K, K)`` of the target columns (phi coefficient for 0/1).

    A constant column gets NaN correlations off the diagonal and 1 on it.
    """
    arr = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    k = arr.shape[1]
    centered = arr - arr.mean(0)
    cov = centered.T @ centered
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    corr[np.arange(k), np.arange(k)] = 1.0
    out: np.ndarray = np.asarray(corr, dtype=np.float64)
    return out


@dataclass
class DataSplits:
    """Train / validation / test datasets sharing one schema and task list.

    Attributes:
        train, valid, test: the three :class:`TabularDataset`.
        name: dataset name (e.g. ``"census-income/group2"``).
        info: provenance and preprocessing facts (seed, protocol, files, statistics...).
    """

    train: TabularDataset
    valid: TabularDataset
    test: TabularDataset
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in ("valid", "test"):
            ds = getattr(self, part)
            if ds.tasks != self.train.tasks:
                raise ValueError(f"DataSplits: {part} tasks {ds.tasks} differ from train's")
            if ds.schema != self.train.schema:
                raise ValueError(f"DataSplits: {part} schema differs from train's")
            if (ds.groups is None) != (self.train.groups is None):
                raise ValueError(
                    "DataSplits: either every split has group ids or none does "
                    f"(train: {self.train.groups is not None}, {part}: {ds.groups is not None})"
                )

    @property
    def tasks(self) -> list[TaskSpec]:
        """The K task specs."""
        return self.train.tasks

    @property
    def task_names(self) -> list[str]:
        """The K task names."""
        return self.train.task_names

    @property
    def num_tasks(self) -> int:
        """K."""
        return self.train.num_tasks

    @property
    def schema(self) -> FeatureSchema:
        """The shared feature schema."""
        return self.train.schema

    @property
    def has_groups(self) -> bool:
        """Whether the rows carry group ids (``TabularDataset.groups``) for group metrics."""
        return self.train.groups is not None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``mtl.models.build_model(name, **splits.model_kwargs())``."""
        return {
            "num_numeric": self.schema.num_numeric,
            "cardinalities": list(self.schema.cardinalities),
            "num_tasks": self.num_tasks,
        }

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary: split sizes, per-task positive rates (binary) or mean/std
        (regression) per split, and the train-split label correlation matrix."""
        parts = {"train": self.train, "valid": self.valid, "test": self.test}
        corr = label_correlation(self.train.y) if len(self.train) else np.full((1, 1), np.nan)
        return {
            "name": self.name,
            "sizes": {k: len(v) for k, v in parts.items()},
            "tasks": [{"name": t.name, "kind": t.kind} for t in self.tasks],
            "num_numeric": self.schema.num_numeric,
            "cardinalities": list(self.schema.cardinalities),
            "label_stats": {k: _label_stats(v) for k, v in parts.items()},
            "label_correlation": corr.tolist(),
        }


def _validate_fractions(fractions: Sequence[float]) -> np.ndarray:
    fr = np.asarray(list(fractions), dtype=np.float64)
    if fr.ndim != 1 or len(fr) not in (2, 3):
        raise ValueError(f"fractions must have 2 or 3 entries, got {list(fractions)}")
    if (fr < 0).any() or not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    return fr


def stratified_split(
    labels: np.ndarray | Tensor,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Split rows into parts that keep the joint label distribution.

    Rows are stratified on the combination of their label values (the joint 0/1 pattern of the
    binary tasks; pass only the binary columns). Within each stratum the rows are shuffled
    (``numpy.random.default_rng(seed)``) and spread evenly over the quantile scale
    ``q = (rank + 0.5) / stratum_size``; all rows are then ordered by ``q`` and cut at the exact
    global part sizes ``round(fraction * N)``. Each part therefore gets its fraction of every
    stratum up to one row, and the global sizes are exact.

    Args:
        labels: ``(N,)`` or ``(N, K)`` array of labels (any values; rows with equal label
            tuples form a stratum).
        fractions: 2 or 3 non-negative fractions summing to 1.
        seed: random seed.

    Returns:
        One sorted int64 index array per fraction.
    """
    fr = _validate_fractions(fractions)
    lab = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    if lab.ndim == 1:
        lab = lab[:, None]
    if lab.ndim != 2:
        raise ValueError(f"labels must have shape (N,) or (N, K), got {lab.shape}")
    n = int(lab.shape[0])
    rng = np.random.default_rng(seed)
    if lab.shape[1] == 0 or n == 0:
        strata = np.zeros(n, dtype=np.int64)
    else:
        _, strata = np.unique(lab, axis=0, return_inverse=True)
        strata = strata.reshape(-1)
    perm = rng.permutation(n)
    order = perm[np.argsort(strata[perm], kind="stable")]  # grouped by stratum, shuffled within
    counts = np.bincount(strata, minlength=int(strata.max()) + 1 if n else 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, np.int64)
    sorted_strata = strata[order]
    rank = np.arange(n) - starts[sorted_strata]
    q = np.empty(n, dtype=np.float64)
    q[order] = (rank + 0.5) / counts[sorted_strata]
    tiebreak = rng.random(n)
    final = np.lexsort((tiebreak, q))
    sizes = np.round(np.cumsum(fr) * n).astype(np.int64)
    sizes[-1] = n
    bounds = np.concatenate([[0], sizes])
    return tuple(np.sort(final[bounds[i] : bounds[i + 1]]).astype(np.int64) for i in range(len(fr)))
