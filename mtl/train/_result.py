"""What :func:`mtl.train.fit` returns: :class:`TrainResult`, and the summaries it holds."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._state import RunState

__all__ = ["TrainResult", "build_result"]


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch: ``epoch``, ``step`` (optimizer steps so far),
            ``train_loss`` ``{task: mean loss}``, ``weights_mean`` (mean balancer coefficients
            over the epoch's steps, averaged over blocks for per-block methods),
            ``step_time_s`` (mean backward+step time), ``epoch_time_s``, ``lr`` (learning rate of
            the first parameter group during the epoch), ``skipped`` (steps
            skipped for non-finite values), and, on evaluated epochs, ``valid``
            (:func:`evaluate` output), ``score`` (:func:`selection_score`) and ``eval_time_s``.
            An epoch cut short by ``max_steps`` is marked ``"partial": True``.
        best_epoch: the epoch whose state was restored (``None`` when no score was finite).
        best_score: its validation score.
        valid_metrics: validation metrics of the returned model.
        test_metrics: test metrics of the returned model (``None`` when not evaluated).
        epochs: number of completed epochs.
        steps: number of optimizer steps.
        stopped_early: whether early stopping ended the run.
        step_time_s: median time of one ``optimizer.backward`` + ``optimizer.step`` (seconds).
        step_time_mean_s: the mean of the same.
        iter_time_s: median time of one whole iteration (forward, losses, backward, step).
        weights_mean: mean coefficients over all steps (``(K,)`` as a list).
        weights_trace: ``[(step, [c_1..c_K]), ...]``: coefficients averaged over consecutive
            windows of steps, at most ``trace_points`` entries (``step`` = last step of a window).
        train_time_s: wall time of the training loop, evaluation included.
        task_names: the K task names.
    """

    history: list[dict[str, Any]]
    best_epoch: int | None
    best_score: float | None
    valid_metrics: dict[str, dict[str, float]]
    test_metrics: dict[str, dict[str, float]] | None
    epochs: int
    steps: int
    stopped_early: bool
    step_time_s: float
    step_time_mean_s: float
    iter_time_s: float
    weights_mean: list[float]
    weights_trace: list[tuple[int, list[float]]]
    train_time_s: float
    task_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (floats, lists and dicts only)."""
        return {
            "task_names": list(self.task_names),
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "valid_metrics": self.valid_metrics,
            "test_metrics": self.test_metrics,
            "epochs": self.epochs,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "step_time_s": self.step_time_s,
            "step_time_mean_s": self.step_time_mean_s,
            "iter_time_s": self.iter_time_s,
            "weights_mean": list(self.weights_mean),
            "weights_trace": [[s, list(w)] for s, w in self.weights_trace],
            "train_time_s": self.train_time_s,
            "history": copy.deepcopy(self.history),
        }


def build_result(
    state: RunState,
    task_names: list[str],
    valid_metrics: dict[str, dict[str, float]],
    test_metrics: dict[str, dict[str, float]] | None,
    trace_points: int,
) -> TrainResult:
    """The :class:`TrainResult` of a finished run."""
    w = state.weights_steps
    weights_mean: list[float] = (
        np.asarray(w, dtype=np.float64).mean(0).tolist() if w else [float("nan")] * len(task_names)
    )
    return TrainResult(
        history=state.history,
        best_epoch=state.best_epoch,
        best_score=None if state.best_epoch is None else state.best_score,
        valid_metrics=valid_metrics,
        test_metrics=test_metrics,
        epochs=state.epoch,
        steps=state.step,
        stopped_early=state.stopped_early,
        step_time_s=_median(state.step_times),
        step_time_mean_s=_mean(state.step_times),
        iter_time_s=_median(state.iter_times),
        weights_mean=weights_mean,
        weights_trace=_thin(w, trace_points),
        train_time_s=state.train_time_s,
        task_names=task_names,
    )


def _thin(rows: list[list[float]], points: int) -> list[tuple[int, list[float]]]:
    """Average consecutive windows of per-step rows down to at most ``points`` entries."""
    n = len(rows)
    if n == 0 or points <= 0:
        return []
    if n <= points:
        return [(i + 1, list(r)) for i, r in enumerate(rows)]
    arr = np.asarray(rows, dtype=np.float64)
    edges = np.linspace(0, n, points + 1).round().astype(int)
    out: list[tuple[int, list[float]]] = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            out.append((int(b), arr[a:b].mean(0).tolist()))
    return out


def _warm(xs: Sequence[float]) -> list[float]:
    return list(xs[5:]) if len(xs) > 20 else list(xs)  # drop warm-up steps


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(_warm(xs))) if xs else float("nan")


def _mean(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    warm = _warm(xs)
    return float(sum(warm) / len(warm))
