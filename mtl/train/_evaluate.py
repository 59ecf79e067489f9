"""Evaluation and model selection: :func:`evaluate`, :func:`selection_score`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import metrics as _metrics
from ._options import SelectionMetric

__all__ = ["HIGHER_IS_BETTER", "evaluate", "selection_score"]

#: direction of every metric :func:`evaluate` reports.
HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "log_loss": False, "ne": False, "mse": False}


def _task_metrics(kind: str, y: Tensor, pred: Tensor) -> dict[str, float]:
    nan = float("nan")
    if kind == "regression":
        return _metrics.regression_metrics(y, pred) if y.numel() else {"mse": nan}
    if y.numel() == 0:
        return {"auc": nan, "log_loss": nan, "ne": nan}
    try:
        return _metrics.binary_metrics(y, pred)
    except ValueError:  # one class only: AUC and NE are undefined, log loss is not
        return {"auc": nan, "log_loss": _metrics.log_loss(y, pred, from_logits=True), "ne": nan}


def _predict(
    model: nn.Module, dataset: Any, batch_size: int, device: torch.device | str | None, k: int
) -> list[list[Tensor]]:
    """The K outputs of ``model`` on ``dataset``, batch by batch, as float64 on the CPU."""
    preds: list[list[Tensor]] = [[] for _ in range(k)]
    with torch.no_grad():
        for features, _ in dataset.batches(int(batch_size)):
            if device is not None:
                features = features.to(device)
            out = model(features)
            if len(out.task_outputs) != k:
                raise ValueError(
                    f"model returned {len(out.task_outputs)} task outputs for a dataset "
                    f"with {k} tasks"
                )
            for i, o in enumerate(out.task_outputs):
                preds[i].append(o.detach().reshape(-1).to("cpu", torch.float64))
    return preds


def evaluate(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 4096,
    *,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task metrics of ``model`` on ``dataset`` (a :class:`tasks.TabularDataset`).

    Binary tasks: ``{"auc", "log_loss", "ne"}`` (:func:`mtl.metrics.binary_metrics`; AUC and NE
    are NaN when the dataset holds a single class). Regression tasks: ``{"mse"}``. The model runs
    in eval mode under ``torch.no_grad()`` and its training mode is restored afterwards.

    Returns:
        ``{task_name: {metric: value}}``.
    """
    tasks = list(dataset.tasks)
    was_training = model.training
    model.eval()
    try:
        preds = _predict(model, dataset, batch_size, device, len(tasks))
    finally:
        model.train(was_training)
    targets = dataset.targets
    result: dict[str, dict[str, float]] = {}
    for k, t in enumerate(tasks):
        pred = torch.cat(preds[k]) if preds[k] else torch.zeros(0, dtype=torch.float64)
        y = targets[k].detach().to("cpu", torch.float64)
        result[t.name] = _task_metrics(t.kind, y, pred)
    return result


def selection_score(
    metrics: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Any],
    key: SelectionMetric = None,
) -> float:
    """The validation score to maximise (model selection and early stopping).

    Args:
        metrics: what :func:`evaluate` returned.
        tasks: the task specs (``.name``, ``.kind``).
        key: ``None`` (default): the mean over tasks of AUC (binary) and −MSE (regression);
            a metric name (``"auc"``, ``"ne"``, ``"log_loss"``, ``"mse"``): its mean over the
            tasks that report it, negated when lower is better; ``"task/metric"``: one task's
            metric (negated when lower is better); or a callable ``metrics -> float`` (higher is
            better).

    Returns:
        The score (NaN task values are ignored; NaN when nothing is left).
    """
    if callable(key):
        return float(key(metrics))
    values: list[float] = []
    if key is None:
        for t in tasks:
            m = metrics[t.name]
            values.append(m["auc"] if t.kind == "binary" else -m["mse"])
    elif "/" in key:
        name, metric = key.rsplit("/", 1)
        if name not in metrics or metric not in metrics[name]:
            raise ValueError(f"selection metric {key!r} not found in {sorted(metrics)}")
        return _signed(metric, float(metrics[name][metric]))
    else:
        for t in tasks:
            if key in metrics[t.name]:
                values.append(_signed(key, float(metrics[t.name][key])))
        if not values:
            raise ValueError(f"no task reports the selection metric {key!r}")
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def _signed(metric: str, value: float) -> float:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(HIGHER_IS_BETTER)}")
    return value if HIGHER_IS_BETTER[metric] else -value
