"""Peak memory per mode, at one K per section.

CPU: the peak RSS of one fresh child process per mode (:mod:`experiments.bench.child`), so that
no mode inherits another's high-water mark. CUDA: in-process,
``torch.cuda.max_memory_allocated`` over a mode's steps on a fresh model and optimizer around the
section's tables (:func:`cuda_memory_of_mode`). Both fill the section's result rows; section
``overhead`` is about time only and is skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiments.bench.child import CHILD_MARKER, CHILD_MODULE
from experiments.bench.model import BenchModelConfig, build_group, make_embedding
from experiments.bench.modes import ModeSpec, make_mode
from experiments.bench.progress import Progress
from experiments.bench.sections import section_setup
from mtl.models._layers import FeatureEmbedding

__all__ = [
    "KEY_MEMORY_MODES",
    "cuda_memory_of_mode",
    "memory_plan",
    "run_memory",
    "run_memory_child",
    "run_memory_cuda",
]

#: modes measured for peak memory with ``--memory key``
KEY_MEMORY_MODES = {
    "rep": None,  # all of them: the representation-level memory budget
    "param": (
        "plain",
        "param:mgda",
        "param:marigold",
        "rep:mgda",
        "torchjd:mgda:emb",
        "rechub:metabalance",
    ),
    "h2h": ("plain", "param:mgda", "rep:mgda", "torchjd:mgda:emb"),
}


# ---------------------------------------------------------------------------- plan
def _memory_selection(section: str, names: list[str], args: argparse.Namespace) -> list[str]:
    if args.memory_modes:
        wanted = [m.strip() for m in str(args.memory_modes).split(",") if m.strip()]
        return [n for n in names if n in wanted or f"{section}/{n}" in wanted]
    if args.memory == "none":
        return []
    key = KEY_MEMORY_MODES.get(section)
    if args.memory == "all" or key is None:
        return list(names)
    return [n for n in names if n in key]


def memory_plan(
    section: str, data: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Any], int, dict[str, dict[str, Any]], list[str]]:
    """The K, the result rows at that K and the modes (plain first) whose memory is measured."""
    setup = section_setup(section, args)
    k: int = args.memory_tasks if section != "h2h" else max(setup["tasks"])
    if k not in setup["tasks"]:
        k = max(setup["tasks"])
    rows = {r["mode"]: r for r in data["results"] if r["K"] == k}
    names = [n for n in rows if rows[n].get("error") is None]
    chosen = _memory_selection(section, names, args)
    if chosen and "plain" not in chosen:
        chosen.insert(0, "plain")
    return setup, k, rows, chosen


def _plan_section(
    section: str, data: dict[str, Any], args: argparse.Namespace, **record: Any
) -> tuple[dict[str, Any], int, dict[str, dict[str, Any]], list[str]]:
    """:func:`memory_plan`, recorded in ``data["memory"]`` (with ``record``'s entries)."""
    setup, k, rows, chosen = memory_plan(section, data, args)
    data["memory"] = {"K": k, "steps": args.memory_steps, "modes": chosen, **record}
    return setup, k, rows, chosen


def _measure_each(
    chosen: list[str], progress: Progress, desc: str, measure: Callable[[str], dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``measure(name)`` for every chosen mode, under a progress bar."""
    bar = progress(total=len(chosen), desc=desc)
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        results[name] = measure(name)
        bar.update(1)
    bar.close()
    return results


def _fill_rows(
    rows: dict[str, dict[str, Any]],
    results: dict[str, dict[str, Any]],
    prefix: str,
    fields: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
) -> None:
    """Each mode's measurement into its result row: ``fields(its result, plain's result)``, or
    ``{prefix}_error`` for a failed one."""
    base = results.get("plain", {})
    for name, res in results.items():
        if "error" in res:
            rows[name][f"{prefix}_error"] = res["error"]
        else:
            rows[name].update(fields(res, base))


def _timed_sections(sections: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every section but ``overhead`` (about time only)."""
    return [(section, data) for section, data in sections.items() if section != "overhead"]


# ---------------------------------------------------------------------------- CPU: children
def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def run_memory_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`~experiments.bench.child.memory_child` in a fresh interpreter;
    ``{"error": ...}`` on failure."""
    env = dict(os.environ)
    root = str(_repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", CHILD_MODULE, json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            result: dict[str, Any] = json.loads(line[len(CHILD_MARKER) :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return {"error": f"child failed (exit {proc.returncode}): {tail[0][:300]}"}


def _increment(res: dict[str, Any]) -> int | None:
    """RSS added by the steps: their peak minus the RSS before them (KiB)."""
    if res.get("steps_peak_kb") is None or res.get("rss_before_steps_kb") is None:
        return None
    return int(res["steps_peak_kb"]) - int(res["rss_before_steps_kb"])


def _rss_fields(res: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``rss_mb``, ``rss_ratio`` (over plain), ``rss_step_mb`` and ``rss_step_ratio``."""
    out = {"rss_mb": res["peak_kb"] / 1024.0, "rss_source": res.get("source")}
    if "peak_kb" in base:
        out["rss_ratio"] = res["peak_kb"] / base["peak_kb"]
    inc = _increment(res)
    if inc is not None:
        out["rss_step_mb"] = inc / 1024.0
        b_inc = _increment(base) if base and "error" not in base else None
        if b_inc is not None and b_inc > 0:
            out["rss_step_ratio"] = inc / b_inc
    return out


def _measure_rss(
    section: str,
    data: dict[str, Any],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Progress,
) -> None:
    """One child per chosen mode of ``section``; fills its rows."""
    setup, k, rows, chosen = _plan_section(section, data, args)
    if not chosen:
        return
    specs = {m["name"]: m for m in data["modes"]}

    def child(name: str) -> dict[str, Any]:
        spec = {
            "cfg": cfg.to_dict(),
            "section": section,
            "K": k,
            "rows": setup["rows"],
            "sparse": setup["sparse"],
            "mode": specs[name],
            "steps": args.memory_steps,
            "seed": args.seed,
            "threads": args.threads,
        }
        return run_memory_child(spec, args.memory_timeout)

    results = _measure_each(chosen, progress, f"memory {section} K={k}", child)
    _fill_rows(rows, results, "rss", _rss_fields)


def run_memory(
    sections: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Progress,
) -> None:
    """Peak memory per mode at one K per section; fills the result rows.

    CPU: peak RSS of one child process per mode. CUDA: :func:`run_memory_cuda` (in-process,
    ``torch.cuda.max_memory_allocated``). Section ``overhead`` is about time only: skipped.
    """
    if torch.device(cfg.device).type == "cuda":
        run_memory_cuda(sections, args, cfg, progress)
        return
    for section, data in _timed_sections(sections):
        _measure_rss(section, data, args, cfg, progress)


# ---------------------------------------------------------------------------- CUDA: in-process
def cuda_memory_of_mode(
    section: str,
    cfg: BenchModelConfig,
    spec: ModeSpec,
    k: int,
    rows: int,
    sparse: bool,
    embedding: FeatureEmbedding,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Peak CUDA memory of one mode: a fresh model, optimizer and balancer around ``embedding``.

    One untimed warm-up step first (optimizer state, balancer buffers and cuBLAS workspaces exist
    from then on, as in training), then ``torch.cuda.reset_peak_memory_stats()``, ``steps``
    steps and ``torch.cuda.max_memory_allocated()``. Returned (bytes): ``peak`` (everything
    allocated at the peak: tables, model, optimizer state, the step's temporaries) and
    ``before`` (allocated just before the measured steps); ``peak - before`` is what the steps
    add.
    """
    dev = torch.device(cfg.device)
    group = fn = None
    try:
        group = build_group(section, cfg, k, rows, sparse, embedding=embedding, seed=seed)
        fn = make_mode(spec, group)
        fn()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        msg = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]}
    finally:
        del group, fn
        for p in embedding.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    return {"peak": int(peak), "before": int(before), "steps": steps}


def _cuda_fields(res: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``cuda_peak_mb``, ``cuda_peak_ratio`` (over plain), ``cuda_step_mb``, ``cuda_step_ratio``."""
    out = {
        "cuda_peak_mb": res["peak"] / 2**20,
        "cuda_step_mb": (res["peak"] - res["before"]) / 2**20,
    }
    if "peak" in base and base["peak"] > 0:
        out["cuda_peak_ratio"] = res["peak"] / base["peak"]
        b_inc = base["peak"] - base["before"]
        if b_inc > 0:
            out["cuda_step_ratio"] = (res["peak"] - res["before"]) / b_inc
    return out


def _measure_cuda(
    section: str,
    data: dict[str, Any],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Progress,
) -> None:
    """:func:`cuda_memory_of_mode` for every chosen mode of ``section``; fills its rows."""
    setup, k, rows, chosen = _plan_section(
        section, data, args, source="torch.cuda.max_memory_allocated"
    )
    if not chosen:
        return
    results = _cuda_results(section, data, args, cfg, progress, setup, k, chosen)
    gc.collect()  # the section's tables are released by now: return their memory too
    torch.cuda.empty_cache()
    _fill_rows(rows, results, "cuda", _cuda_fields)


def _cuda_results(
    section: str,
    data: dict[str, Any],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Progress,
    setup: dict[str, Any],
    k: int,
    chosen: list[str],
) -> dict[str, dict[str, Any]]:
    """:func:`cuda_memory_of_mode` of every chosen mode around one set of tables, which are
    released on return."""
    specs = {m["name"]: ModeSpec.from_dict(m) for m in data["modes"]}
    embedding = make_embedding(cfg, setup["rows"], setup["sparse"], args.seed)

    def in_process(name: str) -> dict[str, Any]:
        return cuda_memory_of_mode(
            section,
            cfg,
            specs[name],
            k,
            setup["rows"],
            setup["sparse"],
            embedding,
            args.memory_steps,
            args.seed,
        )

    return _measure_each(chosen, progress, f"cuda memory {section} K={k}", in_process)


def run_memory_cuda(
    sections: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Progress,
) -> None:
    """Peak CUDA memory per mode (:func:`cuda_memory_of_mode`) at one K per section.

    Same mode selection as the CPU's peak-RSS children (``--memory``, ``--memory-modes``,
    ``--memory-tasks``); fills ``cuda_peak_mb``, ``cuda_peak_ratio`` (over plain),
    ``cuda_step_mb`` (peak minus allocated before the steps) and ``cuda_step_ratio``.
    """
    for section, data in _timed_sections(sections):
        _measure_cuda(section, data, args, cfg, progress)
