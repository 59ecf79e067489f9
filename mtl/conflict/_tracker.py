"""``ConflictTracker``: task-conflict metrics recorded during training from each step's
:class:`~mtl.BalanceInfo`, with an optional parameter-level probe; rolling-window statistics;
logging sinks; JSON and CSV persistence. This module holds the class (schedule, counters,
sink routing, state); the pieces it combines live next to it: record filling (``_build``), the
parameter-level probe (``_probe``), rolling windows (``_rolling``) and the files (``_persist``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_losses
from .._info import BalanceInfo
from ._build import blank_record, fill_gram, fill_update, set_vector
from ._metrics import as_gram
from ._persist import FORMAT as _FORMAT
from ._persist import VERSION as _VERSION
from ._persist import read_csv, read_json, write_csv, write_json
from ._probe import parameter_gram as parameter_gram
from ._probe import probe_parameters as _probe_parameters
from ._records import record_scalars, rolling_nanmean, scalar_keys, summarize_records, window_cosine
from ._rolling import RollingWindows, recent_records
from ._sinks import HeatmapSink, Sink, _check_sink, _SinkOwner

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._dashboard import DashboardSource

__all__ = ["ConflictTracker"]

Source = Literal["balance", "probe"]


class ConflictTracker(_SinkOwner):
    """Record task-conflict metrics during training, from the Gram matrix the balancer computed.

    Call :meth:`update` after every balanced backward pass; on sampled steps
    (``step % every == 0``) it reads ``info.gram`` and ``info.weights`` and appends one flat
    record to :attr:`history` (no extra backward pass: the overhead is a K x K eigenvalue
    problem). Methods that do not need the Gram matrix (``EqualWeight``, ``MARIGOLD``, the
    loss-level methods ``UW``, ``DWA``, ``RLW``, ``GLS``, ``FAMO``; any class with
    ``requires_gram = False``) leave ``info.gram`` at ``None``: build them with
    ``compute_gram=True`` to get diagnostics (MARIGOLD never computes one). A sampled step
    without a Gram matrix is recorded with ``status="no_gram"`` and NaN Gram metrics, but with
    its losses and weights (learned weights such as UW's, GradNorm's or FAMO's are
    ``info.weights`` like any other), counted in :attr:`num_no_gram`, and warned about once; a step the optimizer skipped because of a
    non-finite loss or gradient (``info.skipped``) is recorded with ``status="skipped"``.

    Optionally, :meth:`update_parameter_level` computes the Gram matrix of the task gradients
    at the shared *parameters* (K extra ``autograd.grad`` calls: as expensive as parameter-level
    balancing) to compare representation-level with parameter-level conflict; its records have
    ``source="probe"`` and ``level="parameters"``.

    Record keys (see :func:`record_columns`): ``step``, ``source`` (``"balance"`` or
    ``"probe"``), ``level`` (``"representation"``/``"parameters"``), ``status`` (``"ok"``,
    ``"no_gram"``, ``"skipped"``), ``conflict_rate``, ``min_cosine``, ``mean_cosine``,
    ``magnitude_similarity_min``, ``magnitude_similarity_mean``, ``condition_number``,
    ``condition_number_aligned``, ``update_norm``, ``min_update_cosine``, and per task
    ``loss[name]``, ``norm[name]``, ``weight[name]``, ``update_cos[name]`` and per pair
    ``cos[a,b]``. Missing values are NaN. For per-block weights (``(blocks, K)``),
    ``weight[name]`` is the mean over blocks and the update cosines use ``info.block_grams``.

    Rolling windows: every record also holds ``conflict_rate_rolling``, the mean conflict rate
    of the last ``window`` records of its source (this one included; NaN-aware: steps without a
    Gram matrix do not count), and per pair ``cos_window[a,b]``, the mean cosine over the same
    records: the off-diagonal entries of :meth:`window_cosine_matrix`. With two tasks the
    per-step conflict rate is 0 or 1; the rolling rate is the share of conflicting steps.

    Logging: each record is also written to the ``sinks`` (:class:`~mtl.conflict.TensorBoardSink`,
    :class:`~mtl.conflict.DictSink`, :class:`~mtl.conflict.CSVSink`, or any object with
    ``write(step, scalars)`` and ``close()``) as one flat ``{key: float}`` dict per step
    (:meth:`scalar_keys`, :meth:`to_dict`): ``conflict/...`` and ``balance/...`` keys, and
    ``probe/...`` for a parameter-level probe of the same step. Sinks get host floats the tracker
    computed anyway; nothing is read from the device for them. A probe is written with the
    :meth:`update` of its step (which completes its update cosines); :meth:`close` writes any
    probe still waiting and closes the sinks.

    Args:
        every: sample every ``every`` steps (``step % every == 0``); default 10.
        param_level_every: schedule of :meth:`update_parameter_level` (``step %
            param_level_every == 0``); ``None`` (default) = the same schedule as ``every``.
        task_names: names used in the record keys (default ``task0``, ``task1``, ...; K is then
            taken from the first update).
        conflict_tol: a pair counts in ``conflict_rate`` when ``cos_ij < -conflict_tol``
            (default 0). Nearly orthogonal tasks (``|cos| ~ 0.01``) flip sign from batch to
            batch; a tolerance such as 0.05 keeps that noise out of the rate (the cosines
            themselves are recorded unchanged).
        window: number of sampled records per rolling window (default 50; with ``every=10``
            that is the last 500 steps).
        sinks: logging sinks written on every recorded step (see above); more with
            :meth:`add_sink`.
    """

    def __init__(
        self,
        every: int = 10,
        param_level_every: int | None = None,
        task_names: Sequence[str] | None = None,
        conflict_tol: float = 0.0,
        *,
        window: int = 50,
        sinks: Iterable[Sink] | None = None,
    ) -> None:
        self.every = _check_every(every, "every")
        self.window = _check_every(window, "window")
        if isinstance(conflict_tol, bool) or not isinstance(conflict_tol, (int, float)):
            raise TypeError(f"conflict_tol must be a number, got {conflict_tol!r}")
        if not 0.0 <= float(conflict_tol) < 1.0:
            raise ValueError(f"conflict_tol must be in [0, 1), got {conflict_tol!r}")
        self.conflict_tol = float(conflict_tol)
        self.param_level_every = (
            None
            if param_level_every is None
            else _check_every(param_level_every, "param_level_every")
        )
        self.task_names: list[str] | None = None
        if task_names is not None:
            self.task_names = _check_names(task_names)
        self.history: list[dict[str, Any]] = []
        self.num_sampled = 0  # sampled balance steps (records with source "balance")
        self.num_no_gram = 0  # ... of which had no Gram matrix
        self.num_skipped = 0  # ... of which the optimizer skipped (non-finite)
        self.num_probes = 0  # parameter-level probes
        self._warned_no_gram = False
        self._pending: tuple[int, Tensor, dict[str, Any]] | None = None
        self.sinks: list[Sink] = [] if sinks is None else [_check_sink(x) for x in sinks]
        self._unsent: list[dict[str, Any]] = []  # probe records not yet written to the sinks
        self._windows = RollingWindows()  # rows of the last `window` records per source

    # ------------------------------------------------------------------ schedule
    def is_sampled(self, step: int) -> bool:
        """Whether :meth:`update` records ``step``."""
        return int(step) % self.every == 0

    def is_probe_step(self, step: int) -> bool:
        """Whether :meth:`update_parameter_level` computes anything at ``step``."""
        every = self.every if self.param_level_every is None else self.param_level_every
        return int(step) % every == 0

    # ------------------------------------------------------------------ recording
    def _names(self, k: int) -> list[str]:
        if self.task_names is None:
            self.task_names = [f"task{i}" for i in range(k)]
        if len(self.task_names) != k:
            raise ValueError(
                f"got {k} tasks but the tracker has {len(self.task_names)} task names "
                f"{self.task_names}"
            )
        return self.task_names

    def update(self, step: int, info: BalanceInfo) -> dict[str, Any] | None:
        """Record the metrics of ``info`` if ``step`` is sampled; return the record or ``None``.

        Reads ``info.gram`` (``(K, K)``), ``info.weights`` (``(K,)`` or ``(blocks, K)``),
        ``info.block_grams``, ``info.losses``, ``info.level`` and ``info.skipped``; never runs a
        backward pass. If a parameter-level probe of the same step is waiting for the weights
        (see :meth:`update_parameter_level`), its update cosines are completed with
        ``info.weights`` (``(K,)`` weights only).
        """
        step = int(step)
        k = int(info.losses.shape[0])
        names = self._names(k)
        weights = info.weights.detach().to(device="cpu", dtype=torch.float64)
        if self._pending is not None:
            p_step, p_gram, p_rec = self._pending
            if p_step == step and not info.skipped and weights.dim() == 1:
                set_vector(p_rec, "weight", names, weights)
                fill_update(p_rec, names, p_gram, weights)
            if p_step <= step:
                self._pending = None
        if not self.is_sampled(step):
            self._emit_probes(step)
            return None
        self.num_sampled += 1
        gram = info.gram
        if info.skipped:
            status = "skipped"
            self.num_skipped += 1
        elif gram is None:
            status = "no_gram"
            self.num_no_gram += 1
            if not self._warned_no_gram:
                self._warned_no_gram = True
                warnings.warn(
                    f"ConflictTracker: BalanceInfo.gram is None at step {step}; the metrics of "
                    "sampled steps are recorded as NaN (their losses and weights are kept). "
                    "Methods that do not need the Gram matrix (EqualWeight, the loss-level "
                    "methods UW, DWA, RLW, GLS, FAMO) compute it for diagnostics when built with "
                    "compute_gram=True.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            status = "ok"
        rec = blank_record(names, step, "balance", info.level, status)
        set_vector(rec, "loss", names, info.losses)
        if not info.skipped:
            w_mean = weights if weights.dim() == 1 else weights.mean(0)
            set_vector(rec, "weight", names, w_mean)
        if status == "ok":
            assert gram is not None
            m = as_gram(gram)
            fill_gram(rec, names, m, self.conflict_tol)
            if weights.dim() == 1 or weights.shape[0] == 1:
                fill_update(rec, names, m, weights)
            elif info.block_grams is not None and info.block_grams.shape[0] == weights.shape[0]:
                fill_update(rec, names, as_gram(info.block_grams, allow_blocks=True), weights)
        self._append(rec)
        self._emit_probes(step, rec)
        return rec

    def update_parameter_level(
        self,
        step: int,
        losses: Sequence[Tensor] | Tensor,
        shared_parameters: Iterable[Tensor],
        weights: Tensor | Sequence[float] | None = None,
    ) -> dict[str, Any] | None:
        """Probe conflict at the shared parameters on sampled steps (expensive).

        Computes ``g_k = dL_k / d theta_shared`` with K ``torch.autograd.grad(L_k, params,
        retain_graph=True)`` calls (``.grad`` is not touched), accumulates the float64 Gram
        matrix parameter by parameter, and records it with ``source="probe"``. The cost is that
        of parameter-level balancing (K backward passes through the trunk), so sample sparsely
        (``param_level_every``). Call it after the forward pass and *before*
        ``opt.backward(...)``, which frees the graph.

        The coefficients of the step are not known yet at that point: pass ``weights`` to
        compute the update cosines now, or leave it ``None`` and the following :meth:`update`
        of the same step fills them in from ``info.weights``. With representation-level weights
        ``c`` the shared parameters receive ``grad sum_k c_k L_k = sum_k c_k g_k``, so these are
        the cosines between the actual parameter update (before the inner optimizer) and each
        task's parameter gradient.

        Returns:
            the record, or ``None`` when ``step`` is not a probe step.
        """
        step = int(step)
        if not self.is_probe_step(step):
            return None
        items = check_losses(losses, None, self._label)
        params = _probe_parameters(shared_parameters)
        k = len(items)
        names = self._names(k)
        m = parameter_gram(items, params)
        self.num_probes += 1
        finite = bool(torch.isfinite(m).all())
        rec = blank_record(names, step, "probe", "parameters", "ok" if finite else "skipped")
        set_vector(rec, "loss", names, torch.stack([t.detach() for t in items]))
        if finite:
            m = as_gram(m)
            fill_gram(rec, names, m, self.conflict_tol)
            if weights is None:
                self._pending = (step, m, rec)  # completed by update() of the same step
            else:
                w = torch.as_tensor(
                    weights.detach().cpu() if isinstance(weights, Tensor) else weights,
                    dtype=torch.float64,
                )
                set_vector(rec, "weight", names, w if w.dim() == 1 else w.mean(0))
                fill_update(rec, names, m, w)
        self._append(rec)
        if self.sinks:
            self._unsent.append(rec)  # written with the update() of its step
        return rec

    # ------------------------------------------------------------------ rolling windows
    def _recent(self, source: str, window: int) -> list[dict[str, Any]]:
        """The last ``window`` records of ``source``, oldest first."""
        return recent_records(self.history, source, window)

    def _append(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` and fill its rolling-window entries (this record included; see
        :class:`~._rolling.RollingWindows`)."""
        names = self.task_names
        assert names is not None
        self._windows.append(self.history, rec, names, self.window)

    def rolling_conflict_rate(
        self, window: int | None = None, source: Source = "balance"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, rates)``: at each record of ``source``, the mean conflict rate of the last
        ``window`` records (default: the tracker's ``window``) up to and including it.

        NaN-aware (records without a Gram matrix are left out of each mean); NaN where a window
        holds no rate at all. With the tracker's own window this equals the records'
        ``conflict_rate_rolling`` (up to rounding), also for histories read back from files
        that predate that key.
        """
        w = self.window if window is None else _check_every(window, "window")
        steps, rates = self.series("conflict_rate", source)
        return steps, rolling_nanmean(rates, w)

    def window_cosine_matrix(
        self, window: int | None = None, source: Source = "balance"
    ) -> np.ndarray:
        """The mean of the cosine matrices of the last ``window`` records of ``source``.

        Float64 ``(K, K)``: off the diagonal the mean cosine of each pair (the latest record's
        ``cos_window[a,b]`` with the tracker's window), on it the share of those records where
        the task's gradient was non-zero (1 unless a task had zero gradients). Records without
        a Gram matrix are left out; all-NaN when none is left (``(0, 0)`` while the task names
        are unknown).
        """
        w = self.window if window is None else _check_every(window, "window")
        names = self.task_names or []
        return window_cosine(self._recent(source, w), names)

    # ------------------------------------------------------------------ sinks
    def add_sink(self, sink: Sink) -> None:
        """Write every following record to ``sink`` too."""
        self.sinks.append(_check_sink(sink))

    def scalar_keys(self, probes: bool | None = None) -> list[str]:
        """The keys of the dicts written to the sinks, in order (task names must be known).

        ``conflict/rate``, ``conflict/rate_rolling``, ``conflict/min_cosine``,
        ``conflict/mean_cosine``, ``conflict/magnitude_similarity_min``,
        ``conflict/magnitude_similarity_mean``, ``conflict/condition_number``,
        ``conflict/condition_number_aligned``, ``conflict/update_norm``,
        ``conflict/min_update_cosine``; per task ``conflict/norm/<name>``,
        ``conflict/update_cos/<name>``; per pair ``conflict/cos/<a>-<b>``,
        ``conflict/cos_window/<a>-<b>``; per task ``balance/weight/<name>``,
        ``balance/loss/<name>``; and with ``probes`` the ``probe/...`` keys of the
        parameter-level probes (the ``conflict/...`` set under ``probe/``). ``probes=None``
        (default): when probes are in use, i.e. ``param_level_every`` was given or a probe was
        recorded.
        """
        if self.task_names is None:
            raise ValueError("the task names are not known yet: pass task_names= or update once")
        keys = scalar_keys(self.task_names, "balance")
        if self._probes_in_use() if probes is None else probes:
            keys += scalar_keys(self.task_names, "probe")
        return keys

    def _probes_in_use(self) -> bool:
        return self.param_level_every is not None or self.num_probes > 0

    def to_dict(
        self, record: Mapping[str, Any] | None = None, *, drop_nan: bool = False
    ) -> dict[str, float]:
        """A record as the flat ``{key: float}`` dict the sinks get (:meth:`scalar_keys`).

        Default: the latest balance record (``{}`` when there is none), e.g.
        ``wandb.log(tracker.to_dict(drop_nan=True), step=step)`` or, in a LightningModule,
        ``self.log_dict(tracker.to_dict(drop_nan=True))``. ``drop_nan`` leaves out missing
        values.
        """
        if record is None:
            recs = self._recent("balance", 1)
            if not recs:
                return {}
            record = recs[0]
        return record_scalars(record, self.task_names or [], drop_nan=drop_nan)

    def _emit_probes(self, step: int, rec: dict[str, Any] | None = None) -> None:
        """Write the waiting probes of steps ``<= step`` and ``rec`` (one dict per step)."""
        if not self.sinks:
            self._unsent.clear()
            return
        due = [p for p in self._unsent if p["step"] <= step]
        self._unsent = [p for p in self._unsent if p["step"] > step]
        by_step: dict[int, list[dict[str, Any]]] = {}
        for p in due:
            by_step.setdefault(int(p["step"]), []).append(p)
        if rec is not None:
            by_step.setdefault(step, []).insert(0, rec)
        for s in sorted(by_step):
            self._write(s, by_step[s])

    def _write(self, step: int, recs: Sequence[Mapping[str, Any]]) -> None:
        names = self.task_names
        assert names is not None
        d: dict[str, float] = dict.fromkeys(scalar_keys(names, "balance"), math.nan)
        if self._probes_in_use():
            d.update(dict.fromkeys(scalar_keys(names, "probe"), math.nan))
        for r in recs:
            d.update(record_scalars(r, names))
        for sink in self.sinks:
            sink.write(step, d)
        # a balance record is written right after it was appended: it is the latest one
        has_balance = any(r["source"] == "balance" for r in recs)
        if has_balance and any(isinstance(sink, HeatmapSink) for sink in self.sinks):
            matrix, n_ok = self._windows.balance_cosine(names)
            title = f"Cosine: mean of the last {n_ok} sampled steps (step {step})"
            for sink in self.sinks:
                if isinstance(sink, HeatmapSink):
                    sink.write_heatmap(step, matrix, names, title)

    def flush(self) -> None:
        """Write the probes still waiting for the :meth:`update` of their step."""
        if self._unsent:
            self._emit_probes(max(int(p["step"]) for p in self._unsent))

    def close(self) -> None:
        """:meth:`flush`, then close every sink (the tracker keeps its history)."""
        self.flush()
        super().close()

    def plot_dashboard(
        self,
        *,
        window: int | None = None,
        source: DashboardSource = "balance",
        fig: Figure | None = None,
    ) -> Figure:
        """Four panels: window-averaged cosine heatmap, conflict with the rolling rate, task
        weights, gradient norms (:func:`mtl.conflict.plot_dashboard`; needs matplotlib)."""
        from ._dashboard import plot_dashboard

        return plot_dashboard(self, window=window, source=source, fig=fig)

    def _label(self, k: int) -> str:
        """``task k`` (with its name when known), for error messages."""
        if self.task_names is not None and k < len(self.task_names):
            return f"task {k} ({self.task_names[k]!r})"
        return f"task {k}"

    # ------------------------------------------------------------------ reading
    def records(self, source: Source | None = "balance") -> list[dict[str, Any]]:
        """The records of one source (``"balance"``, ``"probe"``), or all with ``None``."""
        if source is None:
            return list(self.history)
        return [r for r in self.history if r["source"] == source]

    def series(self, key: str, source: Source = "balance") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` arrays of one record key (e.g. ``"conflict_rate"``)."""
        recs = self.records(source)
        steps = np.array([r["step"] for r in recs], dtype=np.int64)
        vals = np.array([r.get(key, math.nan) for r in recs], dtype=np.float64)
        return steps, vals

    def summary(self) -> dict[str, Any]:
        """Aggregates over the history (NaN-aware means; ``nan`` where nothing was recorded).

        Keys: ``num_sampled``, ``num_ok``, ``num_no_gram``, ``num_skipped``,
        ``mean_conflict_rate``, ``frac_steps_with_conflict`` (share of recorded steps with at
        least one conflicting pair), ``mean_min_cosine``, ``mean_cosine``,
        ``mean_magnitude_similarity_min``, ``mean_magnitude_similarity_mean``,
        ``median_condition_number``, ``frac_rank_deficient`` (condition number inf),
        ``median_condition_number_aligned``, ``mean_min_update_cosine``,
        ``frac_steps_with_negative_update_cosine`` (the update increased some task's loss to
        first order), and per task ``mean_norm[name]``, ``mean_weight[name]``,
        ``mean_update_cos[name]``, per pair ``mean_cos[a,b]`` and ``frac_conflict[a,b]``.
        When parameter-level probes exist, the same statistics of the probes are under
        ``"parameter_level"`` (with ``num_probes``).
        """
        out = summarize_records(self.records("balance"), self.task_names or [])
        out["num_no_gram"] = self.num_no_gram
        out["num_skipped"] = self.num_skipped
        probes = self.records("probe")
        if probes:
            p = summarize_records(probes, self.task_names or [])
            p["num_probes"] = p.pop("num_sampled")
            out["parameter_level"] = p
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, task names, counters and the history."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "every": self.every,
            "param_level_every": self.param_level_every,
            "conflict_tol": self.conflict_tol,
            "window": self.window,
            "task_names": None if self.task_names is None else list(self.task_names),
            "num_sampled": self.num_sampled,
            "num_no_gram": self.num_no_gram,
            "num_skipped": self.num_skipped,
            "num_probes": self.num_probes,
            "warned_no_gram": self._warned_no_gram,
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (history, counters, task names).

        The schedule (``every``, ``param_level_every``), ``window`` and the sinks stay this
        tracker's. Raises ``ValueError`` when the saved task names differ from this tracker's.
        """
        if state.get("format") != _FORMAT:
            raise ValueError(f"not a ConflictTracker state (format={state.get('format')!r})")
        saved = state.get("task_names")
        if saved is not None:
            saved = _check_names(saved)
            if self.task_names is not None and self.task_names != saved:
                raise ValueError(
                    f"saved task names {saved} differ from this tracker's {self.task_names}"
                )
            self.task_names = saved
        self.history = [dict(r) for r in state.get("history", [])]
        self.num_sampled = int(state.get("num_sampled", 0))
        self.num_no_gram = int(state.get("num_no_gram", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
        self.num_probes = int(state.get("num_probes", 0))
        self._warned_no_gram = bool(state.get("warned_no_gram", False))
        self._pending = None
        self._unsent = []

    def to_json(self, path: str | PathLike[str]) -> None:
        """Write :meth:`state_dict` as strict JSON (NaN as ``null``, infinities as strings)."""
        write_json(path, self.state_dict())

    @classmethod
    def from_json(cls, path: str | PathLike[str]) -> ConflictTracker:
        """A tracker restored from :meth:`to_json` output (same schedule, names and history)."""
        state = read_json(path)
        tracker = cls(
            every=state["every"],
            param_level_every=state.get("param_level_every"),
            task_names=state.get("task_names"),
            conflict_tol=float(state.get("conflict_tol", 0.0)),
            window=int(state.get("window", 50)),
        )
        tracker.load_state_dict(state)
        return tracker

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write the history as a CSV table, one row per record (:func:`record_columns`)."""
        write_csv(path, self.task_names or [], self.history)

    @classmethod
    def from_csv(
        cls,
        path: str | PathLike[str],
        every: int = 10,
        param_level_every: int | None = None,
        *,
        window: int = 50,
    ) -> ConflictTracker:
        """A tracker whose history is read from :meth:`to_csv` output.

        Task names are recovered from the ``norm[...]`` columns; the counters are recomputed
        from the records; the schedule and the window are not stored in the CSV (pass them).
        """
        names, history = read_csv(path)
        tracker = cls(
            every=every,
            param_level_every=param_level_every,
            task_names=names or None,
            window=window,
        )
        tracker.history = history
        balance = tracker.records("balance")
        tracker.num_sampled = len(balance)
        tracker.num_no_gram = sum(r["status"] == "no_gram" for r in balance)
        tracker.num_skipped = sum(r["status"] == "skipped" for r in balance)
        tracker.num_probes = len(tracker.records("probe"))
        return tracker

    def __len__(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        return (
            f"ConflictTracker(every={self.every}, param_level_every={self.param_level_every}, "
            f"window={self.window}, task_names={self.task_names}, records={len(self.history)}, "
            f"sinks={len(self.sinks)})"
        )


# ---------------------------------------------------------------------- tracker helpers
def _check_every(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("task_names must be a sequence of strings, not a single string")
    out = [str(n) for n in names]
    if not out:
        raise ValueError("task_names is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"task_names must be unique, got {out}")
    return out
