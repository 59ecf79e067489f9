"""Fair step timing: interleaved, warmed-up, rotated rounds, and ratios against a baseline.

Timing (:func:`interleaved_timings`): warm-up rounds, then ``repeats`` rounds; in every round
each mode runs one block of ``steps`` consecutive steps, round-robin, the starting mode rotating
by one each round. A mode's time of a round is its block's wall time divided by its steps. Ratios
are taken per round against the baseline mode of the same round (:func:`ratio_summary`) and
reported as the median with the min and max over rounds.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Clock", "TimingResult", "device_clock", "interleaved_timings", "ratio_summary"]

Clock = Callable[[], float]


def device_clock(device: str | torch.device) -> Clock:
    """The clock of :func:`interleaved_timings` for ``device``.

    CPU: ``time.perf_counter``. CUDA: ``torch.cuda.synchronize(device)`` and then
    ``time.perf_counter()``, so a timed block starts after every kernel queued before it has
    finished and ends after its own kernels have (CUDA launches are asynchronous: without the
    synchronization a block would measure the launches, not the work).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return time.perf_counter

    def cuda_clock() -> float:
        torch.cuda.synchronize(dev)
        return time.perf_counter()

    return cuda_clock


@dataclass
class TimingResult:
    """Per-mode seconds per step of each timed round (``None`` where the mode had failed)."""

    times: dict[str, list[float]]
    errors: dict[str, str]
    order: list[list[str]]  # the order of the modes in each round (warm-up rounds included)


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _steps_per_mode(names: Sequence[str], steps: int | Mapping[str, int]) -> dict[str, int]:
    per_mode = {n: (steps if isinstance(steps, int) else int(steps.get(n, 1))) for n in names}
    for n, s in per_mode.items():
        if s < 1:
            raise ValueError(f"steps for {n!r} must be >= 1, got {s}")
    return per_mode


def _time_block(fn: Callable[[], Any], steps: int, clock: Clock, collect: bool) -> float:
    """Wall time of ``steps`` calls of ``fn`` (the cyclic collector off inside with ``collect``)."""
    enabled = gc.isenabled()
    if collect:
        gc.disable()
    try:
        t0 = clock()
        for _ in range(steps):
            fn()
        return clock() - t0
    finally:
        if collect and enabled:
            gc.enable()


def interleaved_timings(
    modes: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    steps: int | Mapping[str, int] = 1,
    clock: Clock = time.perf_counter,
    on_block: Callable[[str, int], None] | None = None,
    collect: bool = True,
) -> TimingResult:
    """Time several step callables fairly: interleaved, warmed up, rotated.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds. In round ``r`` the modes run in
    their given order rotated by ``r`` (``modes[r % n:] + modes[:r % n]``), each as a block of
    ``steps`` consecutive calls (an int, or a per-mode mapping; default 1); the block's wall time
    (``clock``) divided by its length is the mode's seconds per step for that round. Machine load
    that drifts over the run therefore hits every mode of a round alike, and no mode always runs
    right after the same neighbour.

    A mode that raises is recorded in ``errors`` (``"Type: message"``) and skipped from then on;
    its times so far are dropped. With ``collect`` (default) the cyclic garbage collector
    runs once at the start of every round (untimed) and is disabled inside the blocks, so no
    collection pause lands in one mode's time. ``on_block(name, round)`` is called after every block (progress bars).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(modes)
    per_mode = _steps_per_mode(names, steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    order: list[list[str]] = []
    for r in range(warmup + repeats):
        shift = r % len(names) if names else 0
        this = names[shift:] + names[:shift]
        order.append(this)
        if collect:
            gc.collect()
        for name in this:
            if name in errors:
                continue
            try:
                dt = _time_block(modes[name], per_mode[name], clock, collect)
            except Exception as exc:  # noqa: BLE001 - a failing mode must not stop the run
                errors[name] = _describe(exc)
                times[name] = []
                continue
            if r >= warmup:
                times[name].append(dt / per_mode[name])
            if on_block is not None:
                on_block(name, r)
    return TimingResult(times=times, errors=errors, order=order)


def ratio_summary(times: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Median and min-max over rounds of ``times[r] / baseline[r]``, plus ms per step.

    Only rounds where both were measured count (the two lists are aligned by round).
    """
    pairs = [(t, b) for t, b in zip(times, baseline) if b > 0 and t > 0]
    ratios = [t / b for t, b in pairs]
    ms = [1000.0 * t for t in times]
    out: dict[str, Any] = {
        "ms_per_step": statistics.median(ms) if ms else math.nan,
        "ms_min": min(ms) if ms else math.nan,
        "ms_max": max(ms) if ms else math.nan,
        "ratio": statistics.median(ratios) if ratios else math.nan,
        "ratio_min": min(ratios) if ratios else math.nan,
        "ratio_max": max(ratios) if ratios else math.nan,
        "ratios": ratios,
        "times_ms": ms,
        "repeats": len(ratios),
    }
    return out
