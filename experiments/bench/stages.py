"""Where the time of one balanced step goes, stage by stage, on a benchmark model.

``python -m experiments.bench.stages --tasks 4 --methods mgda,multibalance,equal``
``python -m experiments.bench.stages --model rep --tasks 16 --steps 20 --warmup 3``

Each stage of the representation-level step is a function of the engine (the per-task passes,
the Gram matrix, the host transfer, the method's weights, the trunk backward...). While a step
runs, :class:`StageTimer` replaces those functions by wrappers that add their
``time.perf_counter`` duration to a per-stage total, and puts the originals back on exit. A
plain step (forward, ``zero_grad``, backward, inner step) is timed the same way, part by part.
Single-threaded CPU timing (``torch.set_num_threads(1)``): the wrappers cost about a
microsecond per call, and a stage nested in another (the trunk backward inside ``backward()``)
is counted in both. Results are the mean over ``--steps`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

import mtl._representation_level as rep_level
import mtl._single_pass as single_pass
from mtl import BalancedOptimizer

from .model import (
    OVERHEAD_MODEL,
    BenchModelConfig,
    Group,
    build_group,
    overhead_config,
    task_losses,
)
from .modes import BalancedStep, ModeSpec

__all__ = [
    "PLAIN_PARTS",
    "STAGES",
    "STEP_LABEL",
    "StageTimer",
    "main",
    "plain_stages",
    "step_stages",
]

#: (owner, attribute, label): the functions timed inside a representation-level ``backward``
STAGES: tuple[tuple[Any, str, str], ...] = (
    (BalancedOptimizer, "_backward", "whole backward()"),
    (rep_level, "representation_rows", "K per-task passes through the heads + row copies"),
    (rep_level, "host_weights", "the method's weights (host)"),
    (torch.autograd, "backward", "trunk backward (autograd.backward)"),
    (BalancedOptimizer, "_analyse", "graph analysis"),
    (rep_level, "close_window", "written-gradient flag"),
    (rep_level, "transfer_grams", "the one host transfer"),
    (rep_level, "device_gram", "Gram matrix on the device"),
    (rep_level, "accumulate_head_grads", "head gradients accumulated"),
    (rep_level, "decide", "verdict"),
    (rep_level, "balance_info", "BalanceInfo"),
    # the same stages on the single-pass paths (EqualWeight's plain backward, loss-level methods)
    (single_pass, "host_weights", "the method's weights (host)"),
    (single_pass, "decide", "verdict"),
    (single_pass, "balance_info", "BalanceInfo"),
)
#: the label of the balanced optimizer's ``step()`` (timed on the instance: ``torch.optim``
#: patches ``step`` on each optimizer class when an instance is made)
STEP_LABEL = "step(), inner optimizer included"
#: the parts of a plain step, in order
PLAIN_PARTS = ("forward", "zero_grad", "backward", "step")


class StageTimer:
    """Context manager: while active, the functions of ``stages`` add their wall time (seconds)
    to ``totals[label]``; on exit the original functions are restored."""

    def __init__(self, stages: Sequence[tuple[Any, str, str]] = STAGES) -> None:
        self.stages = stages
        self.totals: defaultdict[str, float] = defaultdict(float)
        self._saved: list[tuple[Any, str, Any]] = []

    def timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        totals = self.totals

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start

        return wrapper

    def __enter__(self) -> StageTimer:
        for owner, name, label in self.stages:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self.timed(getattr(owner, name), label))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


#: the models: ``overhead`` (section ``overhead``'s small model) and ``rep`` (section ``rep``'s
#: DLRM-like model with 1M-row sparse tables)
MODELS = ("overhead", "rep")


def _group(model: str, num_tasks: int) -> Group:
    if model == "rep":
        return build_group("rep", BenchModelConfig(), num_tasks, 1_000_000, True)
    return build_group(
        "overhead", overhead_config(0, "cpu"), num_tasks, OVERHEAD_MODEL["rows"], False
    )


def step_stages(
    method: str, num_tasks: int, steps: int, warmup: int, model: str = "overhead"
) -> dict[str, float]:
    """Mean microseconds per step of each stage of ``method``'s representation-level step on
    ``model`` (:data:`MODELS`), plus ``"whole step"``."""
    group = _group(model, num_tasks)
    step = BalancedStep(
        ModeSpec(name=f"rep:{method}", kind="ours", method=method, level="representation"), group
    )
    for _ in range(warmup):
        step()
    balancer = step.balancer
    with StageTimer() as timer:
        balancer.step = timer.timed(balancer.step, STEP_LABEL)  # type: ignore[method-assign]
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
    del balancer.step  # the class's step again
    out = {label: 1e6 * t / steps for label, t in timer.totals.items()}
    out["whole step"] = 1e6 * total / steps
    return out


def plain_stages(
    num_tasks: int, steps: int, warmup: int, model: str = "overhead"
) -> dict[str, float]:
    """Mean microseconds per step of the plain step's parts on ``model`` (:data:`MODELS`)."""
    group = _group(model, num_tasks)
    totals: defaultdict[str, float] = defaultdict(float)
    for i in range(warmup + steps):
        marks = [time.perf_counter()]
        x, ys = group.next_batch()
        losses = task_losses(group.model(x).task_outputs, ys)
        marks.append(time.perf_counter())
        group.inner.zero_grad()
        marks.append(time.perf_counter())
        torch.stack(losses).sum().backward()  # type: ignore[no-untyped-call]
        marks.append(time.perf_counter())
        group.inner.step()
        marks.append(time.perf_counter())
        if i >= warmup:
            for label, a, b in zip(PLAIN_PARTS, marks, marks[1:]):
                totals[label] += b - a
            totals["whole step"] += marks[-1] - marks[0]
    return {label: 1e6 * t / steps for label, t in totals.items()}


def _table(columns: dict[str, dict[str, float]]) -> str:
    labels = [
        "whole step",
        *PLAIN_PARTS,
        *dict.fromkeys(label for _, _, label in STAGES),
        STEP_LABEL,
    ]
    lines = [
        "| stage (µs per step) | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label in labels:
        cells = [f"{c[label]:.0f}" if label in c else "–" for c in columns.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.stages", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=4, help="number of tasks K (default 4)")
    parser.add_argument(
        "--methods", default="mgda,multibalance,equal", help="comma-separated balancer names"
    )
    parser.add_argument(
        "--model", choices=MODELS, default="overhead", help="the model (default overhead)"
    )
    parser.add_argument("--steps", type=int, default=500, help="timed steps (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps first (default 50)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    columns = {"plain": plain_stages(args.tasks, args.steps, args.warmup, args.model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MGDA's collapse warning on this model
        for method in args.methods.split(","):
            columns[method] = step_stages(method, args.tasks, args.steps, args.warmup, args.model)
    print(f"K={args.tasks}, {args.model} model, one thread, mean of {args.steps} steps\n")
    print(_table(columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
