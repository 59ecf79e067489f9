"""Evaluation metrics the runner adds to :func:`mtl.train.evaluate`'s (``gauc``,
``calibration``), and the checks of the metric names a configuration asks for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtl import metrics as mtl_metrics

from . import report

__all__ = ["EXTRA_BINARY_METRICS", "check_metric_names", "extra_metrics", "with_group_metrics"]

#: binary-task metrics the runner adds to what :func:`mtl.train.evaluate` reports: ``gauc``
#: (:func:`mtl.metrics.gauc`, needs group ids; always added when the data has them) and
#: ``calibration`` (:func:`mtl.metrics.calibration`; added when a metric list names it).
EXTRA_BINARY_METRICS = ("gauc", "calibration")

_GROUP_HINT = (
    "give the data a group column (CSV task: --set data.group_column=COLUMN, e.g. the user or "
    "query id) or remove 'gauc' from the metric lists"
)


def _has_groups(splits: Any) -> bool:
    return bool(getattr(splits, "has_groups", False))


def _requested(cfg: Mapping[str, Any], kind: str) -> list[str]:
    """Metric names of task ``kind`` in ``table_metrics`` and ``delta_m_metrics``."""
    names: list[str] = []
    for key in ("table_metrics", "delta_m_metrics"):
        for name in (cfg.get(key) or {}).get(kind, []) or []:
            if name not in names:
                names.append(str(name))
    return names


def check_metric_names(cfg: Mapping[str, Any], has_groups: bool) -> None:
    """Raise :class:`tasks.DataError` (a ``ValueError``) for metrics the run cannot report:
    ``gauc`` in ``table_metrics``/``delta_m_metrics`` without group ids, or a ``delta_m_metrics``
    name without a known direction (:data:`experiments.report.HIGHER_IS_BETTER`)."""
    from tasks import DataError

    for key in ("table_metrics", "delta_m_metrics"):
        for kind, names in (cfg.get(key) or {}).items():
            if "gauc" in (names or []) and not has_groups:
                raise DataError(
                    f"{key}.{kind} names 'gauc' (group AUC) but the data has no group ids: "
                    + _GROUP_HINT
                )
    for kind, names in (cfg.get("delta_m_metrics") or {}).items():
        unknown = [n for n in names or [] if n not in report.HIGHER_IS_BETTER]
        if unknown:
            raise DataError(
                f"delta_m_metrics.{kind} names {unknown}, whose direction (higher or lower is "
                f"better) is unknown; use some of {sorted(report.HIGHER_IS_BETTER)}"
            )


def _extra_names(cfg: Mapping[str, Any], has_groups: bool) -> list[str]:
    """The :data:`EXTRA_BINARY_METRICS` this run computes."""
    wanted = _requested(cfg, "binary")
    return [
        m
        for m in EXTRA_BINARY_METRICS
        if (m == "gauc" and has_groups) or (m == "calibration" and m in wanted)
    ]


def with_group_metrics(cfg: Mapping[str, Any], has_groups: bool) -> dict[str, Any]:
    """``cfg`` (a shallow copy) whose ``table_metrics.binary`` lists ``gauc`` (after ``auc``)
    when the data has group ids, so that the tables report GAUC; ``cfg`` unchanged otherwise."""
    out = dict(cfg)
    table = dict(out.get("table_metrics") or {"binary": ["auc", "ne"], "regression": ["mse"]})
    binary = list(table.get("binary") or [])
    if not has_groups or "gauc" in binary:
        return out
    binary.insert(binary.index("auc") + 1 if "auc" in binary else len(binary), "gauc")
    table["binary"] = binary
    out["table_metrics"] = table
    return out


def _predict_logits(model: Any, dataset: Any, batch_size: int) -> list[torch.Tensor]:
    """The K outputs of ``model`` on ``dataset`` in row order, float64 on the CPU."""
    device = next(model.parameters()).device
    k = dataset.num_tasks
    parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for features, _ in dataset.batches(int(batch_size)):
                out = model(features.to(device))
                for i, o in enumerate(out.task_outputs):
                    parts[i].append(o.detach().reshape(-1).to("cpu", torch.float64))
    finally:
        model.train(was_training)
    return [torch.cat(p) if p else torch.zeros(0, dtype=torch.float64) for p in parts]


def extra_metrics(
    model: Any, dataset: Any, names: Sequence[str], *, batch_size: int = 4096
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the binary tasks for ``names`` (some of
    :data:`EXTRA_BINARY_METRICS`) on ``dataset`` (rows in order; ``gauc`` reads
    ``dataset.groups``). A metric that is undefined on this data (no group with both classes,
    no positive label, no rows) is NaN, like AUC on a single-class split."""
    names = [n for n in names if n in EXTRA_BINARY_METRICS]
    binary = [k for k, t in enumerate(dataset.tasks) if t.kind == "binary"]
    if not names or not binary or len(dataset) == 0:
        return {dataset.tasks[k].name: dict.fromkeys(names, float("nan")) for k in binary}
    if "gauc" in names and getattr(dataset, "groups", None) is None:
        from tasks import DataError

        raise DataError("metric 'gauc' (group AUC) needs group ids: " + _GROUP_HINT)
    logits = _predict_logits(model, dataset, batch_size)
    targets = dataset.targets
    out: dict[str, dict[str, float]] = {}
    for k in binary:
        y = targets[k].detach().to("cpu", torch.float64)
        row: dict[str, float] = {}
        for name in names:
            try:
                if name == "gauc":
                    row[name] = mtl_metrics.gauc(y, logits[k], dataset.groups)
                else:
                    row[name] = mtl_metrics.calibration(y, logits[k], from_logits=True)
            except ValueError:  # undefined on this split (e.g. no group holds both classes)
                row[name] = float("nan")
        out[dataset.tasks[k].name] = row
    return out


def _merge(
    metrics: Mapping[str, Mapping[str, float]] | None, extra: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]] | None:
    if metrics is None:
        return None
    return {t: {**m, **extra.get(t, {})} for t, m in metrics.items()}
