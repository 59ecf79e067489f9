"""Logging sinks for the :class:`~mtl.conflict.ConflictTracker` and for :class:`~mtl.BalanceInfo`.

A sink receives one flat ``{key: float}`` dict per logged step (:func:`record_scalars`,
:func:`balance_scalars`) and writes it somewhere: TensorBoard (:class:`TensorBoardSink`), a
callback such as ``wandb.log`` or Lightning's ``log_dict`` (:class:`DictSink`), or a CSV file
(:class:`CSVSink`). Sinks only see host data (Python floats) that the tracker or
:class:`BalanceLogger` already read at their own cadence; they never touch the device.
"""

from __future__ import annotations

import csv
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .._host import to_host
from .._info import BalanceInfo
from ._records import csv_cell

__all__ = [
    "BalanceLogger",
    "CSVSink",
    "DictSink",
    "HeatmapSink",
    "Sink",
    "TensorBoardSink",
    "balance_scalars",
]

_TB_HINT = (
    "TensorBoardSink needs the tensorboard package: pip install tensorboard "
    "(or the extra: pip install 'mtl-balance[tensorboard]')"
)


# ---------------------------------------------------------------------- protocols
@runtime_checkable
class Sink(Protocol):
    """Where logged steps go: ``write(step, scalars)`` per step, ``close()`` at the end.

    ``scalars`` is a flat ``{key: float}`` dict with stable keys (see
    :func:`~mtl.conflict.scalar_keys`); a sink must not keep a reference to it past the call
    (copy it). Any object with these two methods is a sink.
    """

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class HeatmapSink(Sink, Protocol):
    """A sink that can also draw the window-averaged cosine matrix (optional capability).

    The tracker calls ``write_heatmap`` after ``write`` on every logged step that has a
    window matrix; the sink decides whether to draw (e.g. every n-th call).
    """

    def write_heatmap(
        self, step: int, matrix: np.ndarray, task_names: Sequence[str], title: str
    ) -> None: ...


class _Writer(Protocol):
    """What :class:`TensorBoardSink` uses of a ``torch.utils.tensorboard.SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...

    def flush(self) -> Any: ...

    def close(self) -> Any: ...


def _is_nan(v: float) -> bool:
    return v != v


# ---------------------------------------------------------------------- TensorBoard
class TensorBoardSink:
    """Write the scalars of each logged step to TensorBoard with ``SummaryWriter.add_scalar``.

    Args:
        writer_or_logdir: a ``torch.utils.tensorboard.SummaryWriter`` (or any object with
            ``add_scalar(tag, value, global_step)``, ``flush()`` and ``close()``), or a log
            directory for a new ``SummaryWriter``. ``torch.utils.tensorboard`` is imported only
            in the second case; without the ``tensorboard`` package that raises ``ImportError``
            naming ``pip install tensorboard``.
        drop_nan: skip NaN values (missing metrics, e.g. on steps without a Gram matrix) instead
            of writing them (default). Infinite values (a rank-deficient condition number) are
            written.
        heatmap_every: also draw the window-averaged cosine matrix with ``add_figure`` on every
            ``heatmap_every``-th call of :meth:`write_heatmap` (needs matplotlib; each figure
            costs a render, so keep it sparse). ``None`` (default): scalars only.
        heatmap_tag: the figure's tag.
        close_writer: whether :meth:`close` closes the writer. Default: only a writer this sink
            created from a log directory (a writer passed in is flushed, not closed).
    """

    def __init__(
        self,
        writer_or_logdir: str | PathLike[str] | _Writer,
        *,
        drop_nan: bool = True,
        heatmap_every: int | None = None,
        heatmap_tag: str = "conflict/cos_window",
        close_writer: bool | None = None,
    ) -> None:
        if heatmap_every is not None and (
            isinstance(heatmap_every, bool)
            or not isinstance(heatmap_every, int)
            or heatmap_every < 1
        ):
            raise ValueError(f"heatmap_every must be a positive int or None, got {heatmap_every!r}")
        owned = isinstance(writer_or_logdir, (str, PathLike))
        if isinstance(writer_or_logdir, (str, PathLike)):
            self.writer: _Writer = _summary_writer(writer_or_logdir)
        else:
            if not callable(getattr(writer_or_logdir, "add_scalar", None)):
                raise TypeError(
                    "writer_or_logdir must be a log directory or a SummaryWriter-like object "
                    f"with add_scalar, got {type(writer_or_logdir).__name__}"
                )
            self.writer = writer_or_logdir
        self.drop_nan = bool(drop_nan)
        self.heatmap_every = heatmap_every
        self.heatmap_tag = str(heatmap_tag)
        self.close_writer = owned if close_writer is None else bool(close_writer)
        self._heatmap_calls = 0
        self._closed = False

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """``add_scalar(key, value, step)`` for every entry (NaN skipped with ``drop_nan``)."""
        for key, value in scalars.items():
            v = float(value)
            if self.drop_nan and _is_nan(v):
                continue
            self.writer.add_scalar(key, v, int(step))

    def write_heatmap(
        self, step: int, matrix: np.ndarray, task_names: Sequence[str], title: str
    ) -> None:
        """Draw ``matrix`` with ``add_figure`` on every ``heatmap_every``-th call (else nothing)."""
        if self.heatmap_every is None:
            return
        self._heatmap_calls += 1
        if (self._heatmap_calls - 1) % self.heatmap_every:
            return
        add_figure = getattr(self.writer, "add_figure", None)
        if add_figure is None or np.isnan(matrix).all():
            return
        from ._dashboard import cosine_heatmap_figure

        add_figure(
            self.heatmap_tag, cosine_heatmap_figure(matrix, task_names, title), int(step), True
        )

    def flush(self) -> None:
        """Flush the writer's event file (TensorBoard otherwise flushes every two minutes)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush, and close the writer if this sink owns it (see ``close_writer``)."""
        if self._closed:
            return
        self._closed = True
        if self.close_writer:
            self.writer.close()
        else:
            self.writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoardSink({type(self.writer).__name__}, heatmap_every={self.heatmap_every})"


def _summary_writer(logdir: str | PathLike[str]) -> _Writer:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError when tensorboard is missing
        raise ImportError(_TB_HINT) from e
    writer: _Writer = SummaryWriter(log_dir=str(logdir))
    return writer


# ---------------------------------------------------------------------- plain dicts
class DictSink:
    """Keep each step's flat dict and hand it to a callback: W&B, Lightning, your own logger.

    ``sink.last`` is the dict of the latest step; ``sink.rows`` the ``(step, dict)`` pairs kept.
    Keys are stable strings, values Python floats, so the dict goes straight to
    ``wandb.log(d, step=step)`` or a LightningModule's ``self.log_dict(d)``::

        DictSink(lambda d, step: wandb.log(d, step=step))
        DictSink(lambda d, step: self.log_dict(d))  # inside a LightningModule

    Args:
        callback: called as ``callback(scalars, step)`` with a fresh dict on every write.
        drop_nan: leave NaN values out (default; missing metrics).
        keep: keep the last ``keep`` rows (``None``: all; ``0``: none, only ``last``).
    """

    def __init__(
        self,
        callback: Callable[[dict[str, float], int], object] | None = None,
        *,
        drop_nan: bool = True,
        keep: int | None = None,
    ) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be a non-negative int or None, got {keep!r}")
        self.callback = callback
        self.drop_nan = bool(drop_nan)
        self.rows: deque[tuple[int, dict[str, float]]] = deque(maxlen=keep)
        self.last: dict[str, float] = {}
        self.last_step: int | None = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        d = {
            str(k): float(v)
            for k, v in scalars.items()
            if not (self.drop_nan and _is_nan(float(v)))
        }
        self.last, self.last_step = d, int(step)
        if self.rows.maxlen != 0:
            self.rows.append((int(step), dict(d)))
        if self.callback is not None:
            self.callback(dict(d), int(step))

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"DictSink(rows={len(self.rows)}, last_step={self.last_step})"


# ---------------------------------------------------------------------- CSV
class CSVSink:
    """Append each step as a CSV row: ``step`` then one column per key.

    The columns are ``columns`` or, by default, the keys of the first write, in order. The
    header is written once. An existing non-empty file is appended to when its header is
    exactly ``step`` + these columns (a resumed run), and never silently overwritten: a
    different header raises ``ValueError`` naming the file and the differing columns
    (``if_exists="error"`` refuses any existing non-empty file at construction). Values are
    written with ``repr`` (``nan``, ``inf`` included) and read back exactly by :meth:`read`.
    Each write opens, appends and closes the file, so a crash loses at most the current row.

    Args:
        path: the CSV file.
        columns: the keys (without ``step``); default: those of the first write.
        if_exists: ``"append"`` (default; same header required) or ``"error"``.
        extra: a write with keys that are not columns raises (``"error"``, default: nothing is
            dropped silently) or drops them (``"drop"``). Missing keys are written as ``nan``.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        columns: Sequence[str] | None = None,
        *,
        if_exists: Literal["append", "error"] = "append",
        extra: Literal["error", "drop"] = "error",
    ) -> None:
        if if_exists not in ("append", "error"):
            raise ValueError(f"if_exists must be 'append' or 'error', got {if_exists!r}")
        if extra not in ("error", "drop"):
            raise ValueError(f"extra must be 'error' or 'drop', got {extra!r}")
        self.path = Path(path)
        self.extra = extra
        self.columns: list[str] | None = None
        if columns is not None:
            self.columns = self._check_columns(columns)
        if if_exists == "error" and _nonempty(self.path):
            raise FileExistsError(f"{self.path} exists and is not empty (if_exists='error')")
        self._ready = False
        self._colset: frozenset[str] = frozenset()

    def _check_columns(self, columns: Iterable[str]) -> list[str]:
        if isinstance(columns, str):
            raise TypeError("columns must be a sequence of strings, not a single string")
        cols = [str(c) for c in columns]
        if "step" in cols:
            raise ValueError(f"'step' is the first CSV column of {self.path}; not a key")
        if len(set(cols)) != len(cols):
            raise ValueError(f"duplicate CSV columns for {self.path}: {cols}")
        return cols

    def _prepare(self) -> None:
        assert self.columns is not None
        header = ["step", *self.columns]
        if _nonempty(self.path):
            with open(self.path, encoding="utf-8", newline="") as f:
                found = next(csv.reader(f), [])
            if found != header:
                missing = [c for c in header if c not in found]
                unexpected = [c for c in found if c not in header]
                detail = (
                    f"missing {missing}, unexpected {unexpected}"
                    if missing or unexpected
                    else "same columns in a different order"
                )
                raise ValueError(
                    f"{self.path} already holds a CSV with a different header ({detail}); "
                    "appending would mix columns: log to another file or move this one away"
                )
            with open(self.path, "rb") as fb:
                fb.seek(-1, 2)
                needs_newline = fb.read(1) not in (b"\n", b"\r")
            if needs_newline:  # an interrupted last row: keep it, start a new line
                with open(self.path, "a", encoding="utf-8", newline="") as f:
                    f.write("\r\n")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                csv.writer(f).writerow(header)
        self._colset = frozenset(self.columns)
        self._ready = True

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.columns is None:
            self.columns = self._check_columns(scalars)
        if not self._ready:
            self._prepare()
        unknown = [k for k in scalars if k not in self._colset]
        if unknown and self.extra == "error":
            raise ValueError(
                f"{self.path}: keys {unknown} are not columns of this CSV (the columns are fixed "
                "by the header); pass columns=... with every key, or extra='drop'"
            )
        row = [str(int(step))]
        row.extend(csv_cell(float(scalars.get(c, math.nan))) for c in self.columns)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.writer(f).writerow(row)

    def close(self) -> None:
        """Nothing to release (every write closes the file)."""

    @staticmethod
    def read(path: str | PathLike[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(steps, {column: values})`` of a file written by :class:`CSVSink`."""
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not header or header[0] != "step":
                raise ValueError(f"{path} is not a CSVSink file (no 'step' header)")
            rows = [r for r in reader if r]
        for n, r in enumerate(rows, start=2):
            if len(r) != len(header):
                raise ValueError(f"{path}, line {n}: {len(r)} cells for {len(header)} columns")
        steps = np.array([int(r[0]) for r in rows], dtype=np.int64)
        cols = {
            c: np.array([float(r[i]) for r in rows], dtype=np.float64)
            for i, c in enumerate(header)
            if i > 0
        }
        return steps, cols

    def __repr__(self) -> str:
        n = None if self.columns is None else len(self.columns)
        return f"CSVSink({str(self.path)!r}, columns={n})"


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# ---------------------------------------------------------------------- BalanceInfo
def _as_array(v: Any) -> np.ndarray | None:
    """A numeric extra as a float64 array, or ``None`` for anything else."""
    if isinstance(v, (bool, int, float, np.number, np.bool_)):
        return np.asarray(float(v), dtype=np.float64)
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return v.astype(np.float64)
    return None


def balance_scalars(
    info: BalanceInfo, task_names: Sequence[str] | None = None, *, extras: bool = True
) -> dict[str, float]:
    """The coefficients, losses and numeric extras of one step as a flat ``{key: float}`` dict.

    Keys: ``balance/weight/<name>`` (per-block weights: their mean over blocks),
    ``balance/loss/<name>``, ``balance/skipped`` (1.0 when the optimizer skipped the step), and
    with ``extras`` the numeric entries of ``info.extras``: a number as
    ``balance/extras/<key>``, a length-K vector as ``balance/extras/<key>/<name>`` (matrices,
    strings and other objects are left out).

    This reads the tensors to the host in ONE transfer (a device synchronization on a GPU):
    call it at a logging cadence (:class:`BalanceLogger` ``every``), not inside the step.
    """
    k = info.num_tasks
    names = [f"task{i}" for i in range(k)] if task_names is None else [str(n) for n in task_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} task names {names} for {k} tasks")
    tensor_keys: list[str] = []
    tensors: list[Tensor] = [info.weights, info.losses]
    others: dict[str, np.ndarray] = {}
    if extras:
        for key, v in info.extras.items():
            if isinstance(v, Tensor):
                if v.dtype.is_floating_point or v.dtype in _INT_DTYPES:
                    tensor_keys.append(str(key))
                    tensors.append(v)
            else:
                a = _as_array(v)
                if a is not None:
                    others[str(key)] = a
    host = to_host(*tensors)
    w, losses = host[0], host[1]
    assert w is not None and losses is not None
    w_mean = w if w.ndim == 1 else w.reshape(-1, k).mean(axis=0)
    out: dict[str, float] = {}
    for n, x in zip(names, w_mean.tolist()):
        out[f"balance/weight/{n}"] = float(x)
    for n, x in zip(names, losses.reshape(-1).tolist()):
        out[f"balance/loss/{n}"] = float(x)
    out["balance/skipped"] = 1.0 if info.skipped else 0.0
    values: dict[str, np.ndarray] = {}
    for key, a in zip(tensor_keys, host[2:]):
        assert a is not None
        values[key] = a
    values.update(others)
    for key in sorted(values):
        a = values[key]
        if a.size == 1:
            out[f"balance/extras/{key}"] = float(a.reshape(-1)[0])
        elif a.ndim == 1 and a.size == k:
            for n, x in zip(names, a.tolist()):
                out[f"balance/extras/{key}/{n}"] = float(x)
    return out


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


_Owner = TypeVar("_Owner", bound="_SinkOwner")


class _SinkOwner:
    """Base of the objects that write to logging sinks (:class:`BalanceLogger`,
    :class:`~mtl.conflict.ConflictTracker`): :meth:`close` closes the sinks, and the object is
    a context manager that closes them on exit."""

    sinks: list[Sink]

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()

    def __enter__(self: _Owner) -> _Owner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BalanceLogger(_SinkOwner):
    """Log :func:`balance_scalars` of every ``every``-th step to sinks (no Gram matrix needed).

    For methods or runs where a :class:`~mtl.conflict.ConflictTracker` is not wanted (the
    tracker already logs weights and losses with its records)::

        logger = BalanceLogger([TensorBoardSink("runs/famo")], every=10, task_names=names)
        fit(..., on_step=logger.update)  # or logger.update(step, info) in your loop
        logger.close()

    Args:
        sinks: where to write.
        every: log steps with ``step % every == 0``; each logged step reads the info's tensors
            to the host once (:func:`balance_scalars`).
        task_names: names used in the keys (default ``task0``, ``task1``, ...).
        extras: include the numeric ``info.extras``.
    """

    def __init__(
        self,
        sinks: Iterable[Sink],
        every: int = 1,
        task_names: Sequence[str] | None = None,
        *,
        extras: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.sinks: list[Sink] = [_check_sink(s) for s in sinks]
        self.every = every
        self.task_names = None if task_names is None else [str(n) for n in task_names]
        self.extras = bool(extras)

    def update(self, step: int, info: BalanceInfo) -> dict[str, float] | None:
        """Write the step's scalars to every sink on logged steps; return them (else ``None``)."""
        if int(step) % self.every:
            return None
        d = balance_scalars(info, self.task_names, extras=self.extras)
        for sink in self.sinks:
            sink.write(int(step), d)
        return d


def _check_sink(sink: Any) -> Sink:
    if not isinstance(sink, Sink):
        raise TypeError(
            f"a sink needs write(step, scalars) and close() methods, got {type(sink).__name__}"
        )
    return sink
