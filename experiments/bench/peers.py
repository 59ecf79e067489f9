"""Peer libraries for ``python -m experiments bench`` (the ``bench`` extra): TorchJD, torch-rechub.

Both are optional and imported lazily (:func:`importlib.import_module`, when a step is built).
:func:`peer_status` says which are importable and why not; the step factories raise
``ImportError`` when their library is missing.

* TorchJD 0.18: ``torchjd.autojac.mtl_backward(losses, features=z, shared_params=...)`` fills the
  ``.jac`` field (K rows) of every shared parameter and gives each head its own task's gradient;
  ``torchjd.autojac.jac_to_grad(shared_params, aggregator)`` aggregates the Jacobians into
  ``.grad`` and returns the weights (for weighted aggregators). Aggregators: ``MGDA()``
  (Frank-Wolfe, ``epsilon=1e-3``, ``max_iters=100``: the library defaults), ``UPGrad()``,
  ``PCGrad()``. Embedding tables must be dense (``sparse=True`` fails inside the vmapped VJP);
  "excluded" passes only the bottom MLP as ``shared_params``: the tables then receive NO
  gradient at all (TorchJD does not warn).
* torch-rechub 0.9 ``torch_rechub.basic.metaoptimizer.MetaBalance(shared_params)``; its
  ``step(losses)`` runs one full ``loss.backward(retain_graph=True)`` per task and leaves the
  balanced sum in the shared parameters' ``.grad`` (dense gradients only; it raises on sparse
  ones); the inner optimizer then steps. Its trainer crashes with MetaBalance, so it is called
  directly, as the landscape notes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any, cast

from torch import Tensor

from experiments.bench.model import Group, task_losses

__all__ = [
    "INSTALL_HINT",
    "TORCHJD_AGGREGATORS",
    "peer_status",
    "rechub_step",
    "torchjd_aggregator",
    "torchjd_backward",
    "torchjd_step",
]

INSTALL_HINT = 'pip install -e ".[bench]"   (torchjd[full]==0.18.0, torch-rechub)'

TORCHJD_AGGREGATORS = ("mgda", "upgrad", "pcgrad")


def peer_status() -> dict[str, dict[str, Any]]:
    """``{"torchjd": {...}, "rechub": {...}}`` with ``available``, ``version`` and ``reason``."""
    out: dict[str, dict[str, Any]] = {}
    for key, module, dist_name in (
        ("torchjd", "torchjd.autojac", "torchjd"),
        ("rechub", "torch_rechub.basic.metaoptimizer", "torch-rechub"),
    ):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
            out[key] = {
                "available": False,
                "version": None,
                "reason": f"{type(exc).__name__}: {exc}; install with {INSTALL_HINT}",
            }
            continue
        try:
            ver: str | None = version(dist_name)
        except Exception:  # noqa: BLE001
            ver = None
        out[key] = {"available": True, "version": ver, "reason": None}
    return out


def torchjd_aggregator(name: str, **options: Any) -> Any:
    """A TorchJD aggregator by name: ``mgda``, ``upgrad`` or ``pcgrad`` (library defaults)."""
    aggregation = importlib.import_module("torchjd.aggregation")
    classes = {"mgda": "MGDA", "upgrad": "UPGrad", "pcgrad": "PCGrad"}
    if name not in classes:
        raise ValueError(f"unknown TorchJD aggregator {name!r}; choose from {sorted(classes)}")
    return getattr(aggregation, classes[name])(**options)


def torchjd_backward(
    losses: Sequence[Tensor], features: Tensor, params: Sequence[Tensor], aggregator: Any
) -> Tensor | None:
    """``mtl_backward`` + ``jac_to_grad``; returns the aggregator's weights (or None)."""
    autojac = importlib.import_module("torchjd.autojac")
    autojac.mtl_backward(list(losses), features=features, shared_params=list(params))
    return cast("Tensor | None", autojac.jac_to_grad(list(params), aggregator))


def torchjd_step(
    group: Group, aggregator: str, params: Sequence[Tensor], options: dict[str, Any]
) -> Callable[[], Any]:
    """One training step with TorchJD on ``group``'s model (``params``: the shared set)."""
    agg = torchjd_aggregator(aggregator, **options)
    model, inner = group.model, group.inner
    params = list(params)

    def step() -> Any:
        x, ys = group.next_batch()
        out = model(x)
        losses = task_losses(out.task_outputs, ys)
        inner.zero_grad()
        w = torchjd_backward(losses, cast(Tensor, out.representation), params, agg)
        inner.step()
        return w

    return step


def rechub_step(group: Group, options: dict[str, Any]) -> Callable[[], Any]:
    """One training step with torch-rechub's MetaBalance over the shared parameters."""
    metaoptimizer = importlib.import_module("torch_rechub.basic.metaoptimizer")
    model, inner = group.model, group.inner
    meta = metaoptimizer.MetaBalance(group.shared, **options)

    def step() -> None:
        x, ys = group.next_batch()
        losses = task_losses(model(x).task_outputs, ys)
        inner.zero_grad()
        meta.step(losses)  # K full backward passes; shared .grad = balanced sum
        inner.step()

    return step
