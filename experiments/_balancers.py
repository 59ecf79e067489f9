"""Balancer names on the command line: aliases, groups, availability (:mod:`balancers.registry`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from balancers.registry import _ALIASES as _REGISTRY_ALIASES
from balancers.registry import BALANCERS, GROUPS, balancer_class
from mtl import BalancedOptimizer

__all__ = [
    "BalancerError",
    "accepts_closure",
    "balancer_status",
    "canonical_balancer",
    "resolve_balancers",
]

#: spellings accepted for registry names: the registry's own (``nash-mtl``, ``multibalance-s``...)
#: and these
_ALIASES = {
    **_REGISTRY_ALIASES,
    "equalweight": "equal",
    "ew": "equal",
    "mgda-ub": "mgda",
    "mgda_ub": "mgda",
}


class BalancerError(ValueError):
    """An unknown balancer, or one whose module is not available."""


def canonical_balancer(name: str) -> str:
    """The registry key of ``name`` (case-insensitive, aliases resolved)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BALANCERS:
        raise BalancerError(f"unknown balancer {name!r}; choose from {', '.join(BALANCERS)}")
    return key


def balancer_status(name: str) -> str | None:
    """``None`` when the balancer imports, else why it does not."""
    try:
        balancer_class(name)
    except ModuleNotFoundError as e:
        return f"module {e.name!r} not found (not written yet?)"
    except Exception as e:  # a module that exists but fails to import
        return f"import failed: {type(e).__name__}: {e}"
    return None


def resolve_balancers(spec: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Balancer names to run and the unavailable ones (``{name: reason}``).

    ``"all"`` means every registered balancer, and a group name (``balancers.registry.GROUPS``:
    ``core``, ``loss``, ``baselines``) its members; balancers brought in that way whose module
    cannot be imported (or that are not registered) are returned as unavailable (the caller
    reports and skips them). Explicitly named balancers must exist and import, else
    :class:`BalancerError`.
    """
    if isinstance(spec, str):
        items = [s for s in (x.strip() for x in spec.split(",")) if s]
    else:
        items = [str(s).strip() for s in spec]
    if not items:
        raise BalancerError("no balancer given")
    # (name, strict): balancers brought in by "all" or a group may be missing; named ones may not
    candidates: list[tuple[str, bool]] = []
    for s in items:
        if s.lower() == "all":
            candidates += [(b, False) for b in BALANCERS]
        elif s.lower() in GROUPS:
            candidates += [(b, False) for b in GROUPS[s.lower()]]
        else:
            candidates.append((s, True))
    names: list[str] = []
    unavailable: dict[str, str] = {}
    for raw, strict in candidates:
        if not strict and str(raw).strip().lower() not in BALANCERS:
            # a group member that is not registered yet (GROUPS may list it ahead of its module)
            unavailable.setdefault(str(raw).strip().lower(), "not registered (not written yet?)")
            continue
        key = canonical_balancer(raw)
        if key in names or (key in unavailable and not strict):
            continue
        why = balancer_status(key)
        if why is None:
            names.append(key)
        elif strict:
            raise BalancerError(f"balancer {raw!r} is not available: {why}")
        else:
            unavailable[key] = why
    return names, unavailable


def _takes_seed(balancer: str) -> bool:
    """Whether the balancer's constructor takes a ``seed`` (class flag ``accepts_seed``)."""
    return bool(balancer_class(balancer).accepts_seed)


def accepts_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.backward`` wants a ``closure`` (class flag ``needs_closure``)."""
    return isinstance(optimizer, BalancedOptimizer) and bool(type(optimizer).needs_closure)
