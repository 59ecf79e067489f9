"""The pieces of one training run built from a configuration: inner optimizer, LR scheduler,
perturbation regularizer, model options."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["build_inner_optimizer", "build_regularizer", "build_scheduler"]

_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


def build_inner_optimizer(cfg: Mapping[str, Any], params: Iterable[Any]) -> torch.optim.Optimizer:
    """The inner ``torch.optim`` optimizer of ``cfg["optimizer"]`` (``name`` + options)."""
    opts = dict(cfg.get("optimizer", {"name": "adam"}))
    name = str(opts.pop("name", "adam")).lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(_OPTIMIZERS)}")
    inner: torch.optim.Optimizer = _OPTIMIZERS[name](params, **opts)
    return inner


_SCHEDULERS = ("cosine", "step", "none")


def build_scheduler(cfg: Mapping[str, Any], inner: torch.optim.Optimizer) -> Any:
    """The per-epoch LR scheduler of ``cfg["scheduler"]`` (``None`` when absent).

    ``{"name": "cosine"}``: cosine annealing over ``train.epochs`` down to ``eta_min``
    (default 0); ``{"name": "step", "step_size": 10, "gamma": 0.5}``; ``"none"``/``null``.
    """
    spec = cfg.get("scheduler")
    if spec is None:
        return None
    opts = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(opts.pop("name", "none")).lower()
    if name == "none":
        return None
    if name == "cosine":
        opts.setdefault("T_max", max(1, int(cfg.get("train", {}).get("epochs", 10))))
        return torch.optim.lr_scheduler.CosineAnnealingLR(inner, **opts)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(inner, **opts)
    raise ValueError(f"unknown scheduler {name!r}; choose from {_SCHEDULERS}")


def build_regularizer(cfg: Mapping[str, Any], seed: int) -> Any:
    """LSPR / SCR from the config's ``regularizer`` section (``{"name": "lspr", ...options}``),
    seeded with the run's seed; ``None`` for ``"none"`` or no section."""
    spec = dict(cfg.get("regularizer") or {})
    name = str(spec.pop("name", "none")).lower()
    if name in ("none", ""):
        return None
    from balancers import LSPR, SCR

    classes = {"lspr": LSPR, "scr": SCR}
    if name not in classes:
        raise ValueError(f"unknown regularizer {name!r}; choose none, scr or lspr")
    spec.setdefault("seed", seed)
    return classes[name](**spec)


def _model_kwargs(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    m = dict(cfg.get("model", {}))
    name = m.pop("name", "mmoe")
    for key, value in list(m.items()):
        if isinstance(value, list):
            m[key] = tuple(value)
    return str(name), m
