"""Filling one tracker record: a blank record (every key of :func:`record_columns`, NaN), the
metrics of a Gram matrix (:func:`~mtl.conflict.summarize`), the cosines between the applied
update and each task (:func:`~mtl.conflict.update_cosines`), and per-task vectors such as the
losses and the weights. Pure functions of their arguments; the tracker decides what to fill."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._metrics import summarize, update_cosines, update_norm
from ._records import GRAM_KEYS, pair_key, record_columns

__all__ = ["blank_record", "fill_gram", "fill_update", "set_vector"]


def blank_record(
    names: Sequence[str], step: int, source: str, level: str, status: str
) -> dict[str, Any]:
    """A record with every key of ``names``' columns NaN, and its step, source, level, status."""
    rec: dict[str, Any] = dict.fromkeys(record_columns(names), math.nan)
    rec.update(step=int(step), source=source, level=str(level), status=status)
    return rec


def fill_gram(rec: dict[str, Any], names: Sequence[str], m: Tensor, conflict_tol: float) -> None:
    """The Gram-matrix metrics of ``m``: the summary keys, ``norm[name]`` and ``cos[a,b]``."""
    s = summarize(m, conflict_tol=conflict_tol)
    for key in GRAM_KEYS:
        rec[key] = s[key]
    for i, n in enumerate(names):
        rec[f"norm[{n}]"] = s["norms"][i]
    cos = s["cosine"]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rec[pair_key(names[i], names[j])] = cos[i][j]


def fill_update(rec: dict[str, Any], names: Sequence[str], grams: Tensor, weights: Tensor) -> None:
    """``update_cos[name]``, ``min_update_cosine`` and ``update_norm`` of the update ``weights``."""
    uc = update_cosines(grams, weights)
    for i, n in enumerate(names):
        rec[f"update_cos[{n}]"] = float(uc[i])
    rec["min_update_cosine"] = float(uc.min())
    rec["update_norm"] = update_norm(grams, weights)


def set_vector(rec: dict[str, Any], prefix: str, names: Sequence[str], values: Tensor) -> None:
    """``prefix[name]`` = the float64 host value of each task's entry of ``values``."""
    v = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).tolist()
    for n, x in zip(names, v):
        rec[f"{prefix}[{n}]"] = x
