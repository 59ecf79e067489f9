"""Look up balancers by name (used by the experiment runner and configuration files)."""

from __future__ import annotations

import importlib
from typing import Any

from torch.optim import Optimizer

from mtl import BalancedOptimizer

__all__ = ["BALANCERS", "GROUPS", "balancer_class", "make_balancer"]

#: name -> "module:Class" (imported lazily)
BALANCERS: dict[str, str] = {
    "equal": "balancers.equal:EqualWeight",
    "mgda": "balancers.mgda:MGDA",
    "multibalance": "balancers.multibalance:MultiBalance",
    "gradops": "balancers.gradops:GradOPS",
    "pcgrad": "balancers.pcgrad:PCGrad",
    "marigold": "balancers.marigold:MARIGOLD",
    # baselines users compare against (issue 17)
    "uw": "balancers.uw:UW",
    "dwa": "balancers.dwa:DWA",
    "rlw": "balancers.rlw:RLW",
    "gls": "balancers.gls:GLS",
    "famo": "balancers.famo:FAMO",
    "gradnorm": "balancers.gradnorm:GradNorm",
    "multibalance_s": "balancers.multibalance_s:MultiBalanceS",
    "imtlg": "balancers.imtlg:IMTLG",
    "cagrad": "balancers.cagrad:CAGrad",
    "nashmtl": "balancers.nashmtl:NashMTL",
    "alignedmtl": "balancers.alignedmtl:AlignedMTL",
    "upgrad": "balancers.upgrad:UPGrad",
}

#: named groups for the experiments' ``--balancers`` (``all`` = every registered balancer)
GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("equal", "mgda", "multibalance", "gradops", "pcgrad", "marigold"),
    "loss": ("uw", "dwa", "rlw", "gls", "famo"),
    "baselines": (
        "uw", "dwa", "rlw", "gls", "famo", "gradnorm", "imtlg", "cagrad", "nashmtl",
        "alignedmtl", "upgrad", "multibalance_s",
    ),
}  # fmt: skip

_ALIASES = {
    "equalweight": "equal",
    "ew": "equal",
    "mgda-ub": "mgda",
    "mgda_ub": "mgda",
    "multibalance-s": "multibalance_s",
    "imtl-g": "imtlg",
    "nash-mtl": "nashmtl",
    "aligned-mtl": "alignedmtl",
}


def balancer_class(name: str) -> type[BalancedOptimizer]:
    """The balancer class registered under ``name`` (case-insensitive)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose from {sorted(BALANCERS)}")
    module, cls = BALANCERS[key].split(":")
    obj = getattr(importlib.import_module(module), cls)
    if not (isinstance(obj, type) and issubclass(obj, BalancedOptimizer)):
        raise TypeError(f"{BALANCERS[key]} is not a BalancedOptimizer subclass")
    return obj


def make_balancer(
    name: str, optimizer: Optimizer, num_tasks: int | None = None, **options: Any
) -> BalancedOptimizer:
    """Instantiate a balancer by name: ``make_balancer("mgda", Adam(...), 2, normalization="l2")``."""
    return balancer_class(name)(optimizer, num_tasks, **options)
