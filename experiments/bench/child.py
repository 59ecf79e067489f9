"""Memory child of ``python -m experiments bench``: one mode, one fresh process, peak RSS.

``python -m experiments.bench.child '<json spec>'`` builds the model of the spec, runs its
steps and prints one line ``BENCH_CHILD_RESULT {"peak_kb": ...}`` (:func:`memory_child`'s
result, KiB). Started by :func:`experiments.bench.memory.run_memory_child`; not meant to be run
by hand.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from experiments.bench.model import BenchModelConfig, build_group
from experiments.bench.modes import ModeSpec, make_mode

__all__ = ["CHILD_MARKER", "CHILD_MODULE", "main", "memory_child"]

#: the prefix of the child's result line on stdout
CHILD_MARKER = "BENCH_CHILD_RESULT "
#: what the parent runs with ``python -m``
CHILD_MODULE = "experiments.bench.child"


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fallback_peak(seconds_per_step: float) -> dict[str, Any]:
    """Not Linux: the coarse ``ru_maxrss`` (inherited across fork+exec, see :func:`memory_child`)."""
    # imported here: ``resource`` exists on Unix only
    import resource

    return {
        "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "build_peak_kb": None,
        "rss_before_steps_kb": None,
        "steps_peak_kb": None,
        "ms_per_step": 1000 * seconds_per_step,
        "source": "ru_maxrss",
    }


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a memory child: build one group, run ``steps`` steps of one mode, report RSS.

    Peak RSS is read from ``/proc/self/status`` ``VmHWM`` (the high-water mark of this
    process's own address space, which ``exec`` resets). ``getrusage(...).ru_maxrss`` is NOT
    used on Linux: a fork+exec'd child inherits the parent's high-water mark in it, so every
    child of a large parent would report the parent's peak. Returned (KiB): ``peak_kb`` (whole
    life: build and steps), ``build_peak_kb`` (after building model, optimizer and batches),
    ``rss_before_steps_kb`` and ``steps_peak_kb`` (peak during the steps, after resetting the
    mark via ``/proc/self/clear_refs``; ``None`` where that is not possible).
    """
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = BenchModelConfig.from_dict(spec["cfg"])
    mode = ModeSpec.from_dict(spec["mode"])
    group = build_group(
        spec["section"],
        cfg,
        int(spec["K"]),
        int(spec["rows"]),
        bool(spec["sparse"]),
        seed=int(spec["seed"]),
    )
    fn = make_mode(mode, group)
    build_peak = _proc_status_kb("VmHWM")
    rss_before = _proc_status_kb("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    for _ in range(int(spec["steps"])):
        fn()
    dt = (time.perf_counter() - t0) / int(spec["steps"])
    steps_peak = _proc_status_kb("VmHWM")
    if build_peak is None or steps_peak is None:  # not Linux: coarse fallback
        return _fallback_peak(dt)
    return {
        "peak_kb": max(build_peak, steps_peak),
        "build_peak_kb": build_peak,
        "rss_before_steps_kb": rss_before,
        "steps_peak_kb": steps_peak if reset else None,
        "ms_per_step": 1000 * dt,
        "source": "VmHWM",
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.bench.child '<json spec>'``: print the result line; exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {CHILD_MODULE} '<json spec>'", file=sys.stderr)
        return 2
    result = memory_child(json.loads(argv[0]))
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
