"""Datasets and task definitions: synthetic, Census-Income (KDD), the 2-D toy, generic CSV.

Every dataset loader returns a :class:`DataSplits` (train / valid / test
:class:`TabularDataset` sharing a :class:`FeatureSchema` and a list of :class:`TaskSpec`)::

    from tasks import load_census
    splits = load_census(group=2, seed=0)
    model = build_model("mmoe", **splits.model_kwargs())
    for features, targets in splits.train.batches(1024, shuffle=True, generator=g):
        out = model(features)      # features: mtl.models.Features

The toy problem (:mod:`tasks.toy`) is a 2-D two-objective function plus a :class:`ToyModel`.
"""

from ._data import (
    DataError,
    DataSplits,
    FeatureSchema,
    TabularDataset,
    TaskKind,
    TaskSpec,
    label_correlation,
    stratified_split,
)
from .census import load_census
from .registry import available_tasks, load_task, register_task
from .synthetic import make_synthetic
from .tabular_csv import load_csv
from .toy import TOY_SCALES, TOY_STARTS, ToyModel, pareto_front, toy_losses

__all__ = [
    "DataError",
    "DataSplits",
    "FeatureSchema",
    "TabularDataset",
    "TaskKind",
    "TaskSpec",
    "label_correlation",
    "stratified_split",
    "load_census",
    "make_synthetic",
    "load_csv",
    "load_task",
    "available_tasks",
    "register_task",
    "TOY_SCALES",
    "TOY_STARTS",
    "ToyModel",
    "pareto_front",
    "toy_losses",
]
