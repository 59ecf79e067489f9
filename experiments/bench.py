"""``python -m experiments bench``: step time and peak memory of every balancer, side by side.

What it measures (details and the method in ``docs/benchmarks.md``)::

    python -m experiments bench --out runs/bench            # full default (~8-9 min, 2 cores)
    python -m experiments bench --quick --out /tmp/bench    # tiny sizes, ~20 s (CI)
    python -m experiments.bench ...                         # the same, without the dispatcher

Model: DLRM-like :class:`mtl.models.SharedBottom`: ``--fields`` (8) categorical fields with one
``--rows`` x ``--dim`` (1M x 16) table each, ``--numeric`` (13) dense features, bottom MLP
``--bottom`` (512-256, its output is the balance point), one tower ``--tower`` (64) -> 1 logit
per task, K in ``--tasks`` (2,4,8,16), batch ``--batch-size`` (1024), binary cross-entropy.
Optimizer: Adam (lr 1e-3) for everything dense, plain SGD (lr 0.01; or ``--table-optimizer
sparseadam`` for sparse tables) for the embedding tables.

Sections (each an interleaved timing run per K, ratios against the section's own plain step
``sum(losses).backward(); inner.step()``):

* ``rep``: sparse tables (``nn.Embedding(sparse=True)``), ``--rows`` rows: every balancer at the
  representation level, MARIGOLD at the parameter level (it needs no per-task gradient, so
  sparse tables work), MGDA-UB with a ``ConflictTracker(every=10)`` (diagnostics overhead).
* ``param``: dense tables of ``--param-rows`` rows (parameter level needs dense per-task
  gradients: K x fields x rows x dim x 4 bytes): every balancer at the parameter level,
  MGDA-UB and MultiBalance at the representation level (same model: the two cost claims),
  TorchJD (MGDA, UPGrad, PCGrad; tables in / out of the shared set) and torch-rechub MetaBalance.
* ``h2h``: dense tables of ``--rows`` rows, K in ``--h2h-tasks``: our MGDA (parameter and
  representation level) against TorchJD ``mtl_backward`` + MGDA, and the weights' agreement.
* ``overhead``: a deliberately SMALL model (:data:`OVERHEAD_MODEL`: 4 dense tables of 1000 x 8,
  4 numeric features, bottom 32-16, towers of width 8, batch 64; a step takes about a
  millisecond) where per-operation overhead dominates: it stands in, on the CPU, for what a GPU
  pays per kernel launch and host synchronization. Plain step vs every balancer at the
  representation level, ``--overhead-steps`` (50) steps per timed block, plus the host syncs
  (``item``, ``tolist``, ``bool``...) counted inside one untimed backward per mode
  (:mod:`experiments.bench_syncs`).

``--device cuda`` puts everything (tables, model, batches, optimizer state) on the GPU; the
timed blocks are then bracketed by ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` per mode (in-process) instead of the peak-RSS children.

Plus: peak RSS per mode in a child process, MARIGOLD's weights against the exact MGDA weights
along a short training run, the two cost claims as tables, and the performance budget of
DESIGN.md. Output (``--out``): ``results.json``, ``results.md``, ``bench_ratios.png``,
``bench_marigold.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.bench_core import (
    BenchModelConfig,
    ModeSpec,
    build_group,
    count_backward_syncs,
    device_clock,
    interleaved_timings,
    make_embedding,
    make_mode,
    ratio_summary,
    sparse_aware_gram,
    task_losses,
)
from experiments.bench_peers import INSTALL_HINT, TORCHJD_AGGREGATORS, peer_status

__all__ = ["add_arguments", "main", "run"]

ALL_BALANCERS = ("equal", "mgda", "multibalance", "gradops", "pcgrad", "marigold")
SECTIONS = ("rep", "param", "h2h", "overhead")
#: the overhead section's model: small enough that per-operation overhead dominates a step
OVERHEAD_MODEL: dict[str, Any] = {
    "fields": 4,
    "rows": 1000,
    "dim": 8,
    "numeric": 4,
    "bottom": (32, 16),
    "tower": (8,),
    "batch_size": 64,
    "sparse": False,
}
#: budget of the overhead section: representation-level MGDA vs plain at this K
OVERHEAD_BUDGET = (4, 1.3)
REP_BUDGET_METHODS = ("mgda", "multibalance", "gradops", "pcgrad")
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
CHILD_MARKER = "BENCH_CHILD_RESULT "
#: flatness criterion for "MARIGOLD flat in K": max/min of its median ratio over K
FLAT_TOLERANCE = 1.15

QUICK = {
    "rows": 2000,
    "param_rows": 1000,
    "tasks": "2,4",
    "h2h_tasks": "2",
    "batch_size": 128,
    "bottom": "64,32",
    "tower": "16",
    "repeats": 2,
    "steps": 1,
    "param_repeats": 2,
    "param_steps": 1,
    "warmup": 1,
    "memory_modes": "rep/plain,rep/rep:mgda",
    "memory_steps": 1,
    "lambda_tasks": "2",
    "lambda_steps": 10,
    "lambda_every": 5,
    "overhead_steps": 5,
    "threads": 1,
}


# ---------------------------------------------------------------------------- arguments
def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (used by ``python -m experiments bench``)."""
    p = parser
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda / cuda:N: where tables, model, batches and optimizer "
        "state live; on CUDA the timing is synchronized and peak memory is "
        "torch.cuda.max_memory_allocated per mode",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny CI-sized run (< 1 min): small tables and MLP, K=2,4, 2 repeats",
    )
    p.add_argument("--tasks", help="K values, comma-separated (default 2,4,8,16)")
    p.add_argument(
        "--rows", type=int, help="rows per table, sections rep and h2h (default 1000000)"
    )
    p.add_argument(
        "--param-rows",
        type=int,
        help="rows per (dense) table in the parameter-level section (default 100000)",
    )
    p.add_argument("--h2h-tasks", help="K values of the TorchJD head-to-head at --rows (default 4)")
    p.add_argument("--fields", type=int, default=8, help="categorical fields (default 8)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim (default 16)")
    p.add_argument("--numeric", type=int, default=13, help="dense features (default 13)")
    p.add_argument("--bottom", help="bottom MLP widths (default 512,256)")
    p.add_argument("--tower", help="tower hidden widths (default 64)")
    p.add_argument("--batch-size", type=int, help="batch size (default 1024)")
    p.add_argument(
        "--table-optimizer",
        choices=("sgd", "sparseadam"),
        default="sgd",
        help="optimizer of the embedding tables (sparseadam: sparse tables only; "
        "dense tables always use SGD). Everything else: Adam",
    )
    p.add_argument(
        "--balancers",
        default="all",
        help=f"comma-separated subset of {','.join(ALL_BALANCERS)} (default all)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of rep,param,h2h,overhead (default all)",
    )
    p.add_argument(
        "--repeats", type=int, help="timed rounds, sections rep and overhead (default 5)"
    )
    p.add_argument("--steps", type=int, help="steps per block, section rep (default 3)")
    p.add_argument(
        "--param-repeats", type=int, help="timed rounds, sections param and h2h (default 3)"
    )
    p.add_argument(
        "--param-steps", type=int, help="steps per block, sections param and h2h (default 1)"
    )
    p.add_argument(
        "--overhead-steps",
        type=int,
        help="steps per block, section overhead (default 50: a step there is ~1 ms)",
    )
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds (default 1)")
    p.add_argument(
        "--memory",
        choices=("key", "all", "none"),
        default="key",
        help="peak-RSS children: key (every rep-section mode, the main modes of the "
        "others; default), all, none",
    )
    p.add_argument(
        "--memory-modes",
        help="comma-separated modes to measure, NAME (every section) or SECTION/NAME, "
        "e.g. rep/plain,rep/rep:mgda (overrides --memory)",
    )
    p.add_argument(
        "--memory-tasks", type=int, help="K of the memory runs (default: largest --tasks)"
    )
    p.add_argument("--memory-steps", type=int, help="steps each memory child runs (default 2)")
    p.add_argument(
        "--memory-timeout",
        type=float,
        default=900.0,
        help="seconds before a memory child is killed (default 900)",
    )
    p.add_argument(
        "--lambda-tasks", help="K values of the MARIGOLD-vs-MGDA weight run (default 4,16)"
    )
    p.add_argument("--lambda-steps", type=int, help="training steps of that run (default 100)")
    p.add_argument("--lambda-every", type=int, help="exact MGDA weights every N steps (default 10)")
    p.add_argument("--no-peers", action="store_true", help="skip TorchJD and torch-rechub")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the ConflictTracker mode")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars, notes or final table")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the defaults (or the --quick sizes)."""
    defaults = {
        "rows": 1_000_000,
        "param_rows": 100_000,
        "tasks": "2,4,8,16",
        "h2h_tasks": "4",
        "batch_size": 1024,
        "bottom": "512,256",
        "tower": "64",
        "repeats": 5,
        "steps": 3,
        "param_repeats": 3,
        "param_steps": 1,
        "warmup": 1,
        "memory_modes": None,
        "memory_steps": 2,
        "lambda_tasks": "4,16",
        "lambda_steps": 100,
        "lambda_every": 10,
        "overhead_steps": 50,
    }
    if args.quick:
        defaults.update(QUICK)
    defaults.setdefault("threads", None)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.tasks = _ints(args.tasks) if isinstance(args.tasks, str) else list(args.tasks)
    args.h2h_tasks = (
        _ints(args.h2h_tasks) if isinstance(args.h2h_tasks, str) else list(args.h2h_tasks)
    )
    args.lambda_tasks = (
        _ints(args.lambda_tasks) if isinstance(args.lambda_tasks, str) else list(args.lambda_tasks)
    )
    args.bottom = tuple(_ints(args.bottom)) if isinstance(args.bottom, str) else tuple(args.bottom)
    args.tower = tuple(_ints(args.tower)) if isinstance(args.tower, str) else tuple(args.tower)
    if args.balancers in (None, "all"):
        args.balancers = list(ALL_BALANCERS)
    else:
        args.balancers = [b.strip().lower() for b in str(args.balancers).split(",") if b.strip()]
        bad = [b for b in args.balancers if b not in ALL_BALANCERS]
        if bad:
            raise ValueError(f"unknown balancer(s) {bad}; choose from {list(ALL_BALANCERS)}")
    args.sections = [s.strip() for s in str(args.sections).split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    if args.memory_tasks is None:
        args.memory_tasks = max(args.tasks)
    for name in (
        "rows",
        "param_rows",
        "batch_size",
        "repeats",
        "steps",
        "param_repeats",
        "param_steps",
        "memory_steps",
        "lambda_steps",
        "lambda_every",
        "overhead_steps",
        "fields",
        "dim",
    ):
        if int(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    args.device = _check_device(getattr(args, "device", None) or "cpu")
    return args


def _check_device(text: str) -> str:
    """``text`` as a device string, or ValueError naming the problem (before anything runs)."""
    try:
        dev = torch.device(str(text).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {text}: CUDA is not available on this machine "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}, "
            f"torch.cuda.is_available() is False); run with --device cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {text}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return str(dev)


def _model_config(args: argparse.Namespace) -> BenchModelConfig:
    return BenchModelConfig(
        fields=args.fields,
        dim=args.dim,
        numeric=args.numeric,
        bottom=args.bottom,
        tower=args.tower,
        batch_size=args.batch_size,
        table_optimizer=args.table_optimizer,
        seed=args.seed,
        device=args.device,
    )


def _overhead_config(args: argparse.Namespace) -> BenchModelConfig:
    """The small model of section ``overhead`` (:data:`OVERHEAD_MODEL`)."""
    m = OVERHEAD_MODEL
    return BenchModelConfig(
        fields=m["fields"],
        dim=m["dim"],
        numeric=m["numeric"],
        bottom=tuple(m["bottom"]),
        tower=tuple(m["tower"]),
        batch_size=m["batch_size"],
        table_optimizer="sgd",
        seed=args.seed,
        device=args.device,
    )


def _section_config(
    section: str, args: argparse.Namespace, cfg: BenchModelConfig
) -> BenchModelConfig:
    return _overhead_config(args) if section == "overhead" else cfg


# ---------------------------------------------------------------------------- mode lists
def _ours(method: str, level: str, **options: Any) -> ModeSpec:
    prefix = "rep" if level == "representation" else "param"
    return ModeSpec(
        name=f"{prefix}:{method}",
        kind="ours",
        method=method,
        level=level,
        options=tuple(sorted(options.items())),
    )


def section_modes(section: str, args: argparse.Namespace, peers: dict[str, Any]) -> list[ModeSpec]:
    """The modes of one section, plain first."""
    bal = args.balancers
    modes = [ModeSpec(name="plain", kind="plain")]
    if section == "rep":
        modes += [_ours(b, "representation") for b in bal]
        if "marigold" in bal:
            modes.append(_ours("marigold", "parameters"))
        if "mgda" in bal:
            # exact parameter-level MGDA with sparse tables: only the touched rows of each
            # table enter the per-task gradients and the Gram matrix
            modes.append(_ours("mgda", "parameters"))
        if "mgda" in bal and not args.no_diagnostics:
            modes.append(
                ModeSpec(
                    name="rep:mgda+tracker",
                    kind="tracker",
                    method="mgda",
                    level="representation",
                    steps=10,
                )
            )
    elif section == "param":
        modes += [_ours(b, "parameters") for b in bal]
        modes += [_ours(b, "representation") for b in ("mgda", "multibalance") if b in bal]
        if not args.no_peers and peers["torchjd"]["available"]:
            for agg in TORCHJD_AGGREGATORS:
                for emb in (True, False):
                    modes.append(
                        ModeSpec(
                            name=f"torchjd:{agg}:{'emb' if emb else 'noemb'}",
                            kind="torchjd",
                            method=agg,
                            level="parameters",
                            include_embeddings=emb,
                        )
                    )
        if not args.no_peers and peers["rechub"]["available"]:
            modes.append(
                ModeSpec(
                    name="rechub:metabalance",
                    kind="rechub",
                    method="metabalance",
                    level="parameters",
                )
            )
    elif section == "h2h":
        if "mgda" in bal:
            modes += [_ours("mgda", "parameters"), _ours("mgda", "representation")]
        if not args.no_peers and peers["torchjd"]["available"]:
            modes += [
                ModeSpec(
                    name="torchjd:mgda:emb",
                    kind="torchjd",
                    method="mgda",
                    level="parameters",
                    include_embeddings=True,
                ),
                ModeSpec(
                    name="torchjd:mgda:noemb",
                    kind="torchjd",
                    method="mgda",
                    level="parameters",
                    include_embeddings=False,
                ),
            ]
    elif section == "overhead":
        modes += [_ours(b, "representation") for b in bal]
    return modes


def _section_setup(section: str, args: argparse.Namespace) -> dict[str, Any]:
    if section == "rep":
        return {
            "rows": args.rows,
            "sparse": True,
            "tasks": args.tasks,
            "repeats": args.repeats,
            "steps": args.steps,
        }
    if section == "overhead":
        return {
            "rows": OVERHEAD_MODEL["rows"],
            "sparse": OVERHEAD_MODEL["sparse"],
            "tasks": args.tasks,
            "repeats": args.repeats,
            "steps": args.overhead_steps,
        }
    if section == "param":
        return {
            "rows": args.param_rows,
            "sparse": False,
            "tasks": args.tasks,
            "repeats": args.param_repeats,
            "steps": args.param_steps,
        }
    return {
        "rows": args.rows,
        "sparse": False,
        "tasks": args.h2h_tasks,
        "repeats": args.param_repeats,
        "steps": args.param_steps,
    }


SECTION_TITLES = {
    "rep": "representation level, sparse tables",
    "param": "parameter level, dense tables",
    "h2h": "head-to-head with TorchJD, dense tables",
    "overhead": "per-operation overhead, small model",
}


def _mem_available(device: str = "cpu") -> int | None:
    """Bytes available for new tensors: free GPU memory on CUDA, ``MemAvailable`` on the CPU."""
    if torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _memory_guard(spec: ModeSpec, per_task_bytes: int, k: int, device: str = "cpu") -> str | None:
    """A reason to skip a parameter-level mode whose per-task gradients would not fit in RAM
    (in free GPU memory on CUDA).

    Estimate: 3 dense copies of the K per-task gradients (the gradients, their stacked rows or
    TorchJD's concatenated Jacobian, and the float64/vmap temporaries).
    """
    if spec.level != "parameters" or spec.kind == "plain" or spec.method == "marigold":
        return None
    if spec.kind == "torchjd" and not spec.include_embeddings:
        return None
    need = 3 * k * per_task_bytes
    avail = _mem_available(device)
    if avail is not None and need > 0.8 * avail:
        where = "GPU memory" if torch.device(device).type == "cuda" else "RAM"
        return (
            f"skipped: estimated {need / 2**30:.1f} GiB of per-task gradients > 80% of the "
            f"{avail / 2**30:.1f} GiB of {where} available"
        )
    return None


# ---------------------------------------------------------------------------- timing sections
def run_section(
    section: str,
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    peers: dict[str, Any],
    progress: Callable[..., Any],
) -> dict[str, Any]:
    """Interleaved timing of every mode of ``section`` for each K; rows of the results table.

    ``cfg`` is the section's model (section ``overhead`` passes its small one). Section
    ``overhead`` also counts, after the timed rounds, the host syncs inside one untimed
    backward of every mode (``syncs_per_backward``).
    """
    setup = _section_setup(section, args)
    specs = section_modes(section, args, peers)
    embedding = make_embedding(cfg, setup["rows"], setup["sparse"], args.seed)
    clock = device_clock(cfg.device)
    rows: list[dict[str, Any]] = []
    for k in setup["tasks"]:
        group = build_group(section, cfg, k, setup["rows"], setup["sparse"], embedding=embedding)
        per_task = group.per_task_gradient_bytes()
        modes: dict[str, Callable[[], Any]] = {}
        skipped: dict[str, str] = {}
        for spec in specs:
            reason = _memory_guard(spec, per_task, k, cfg.device)
            if reason:
                skipped[spec.name] = reason
                continue
            try:
                modes[spec.name] = make_mode(spec, group)
            except Exception as exc:  # noqa: BLE001 - a broken balancer must not stop the run
                skipped[spec.name] = f"{type(exc).__name__}: {exc}"
        steps = {s.name: (s.steps or setup["steps"]) for s in specs if s.name in modes}
        total = (args.warmup + setup["repeats"]) * len(modes)
        bar = progress(total=total, desc=f"{section} K={k}")
        timing = interleaved_timings(
            modes,
            repeats=setup["repeats"],
            warmup=args.warmup,
            steps=steps,
            clock=clock,
            on_block=lambda _n, _r, bar=bar: bar.update(1),
        )
        bar.close()
        syncs: dict[str, dict[str, Any] | str | None] = {}
        if section == "overhead":
            for name, fn in modes.items():
                if name in timing.errors:
                    continue
                try:
                    syncs[name] = count_backward_syncs(fn)
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    syncs[name] = f"sync count failed: {type(exc).__name__}: {exc}"[:300]
        base = timing.times.get("plain", [])
        for spec in specs:
            row: dict[str, Any] = {
                "section": section,
                "mode": spec.name,
                "kind": spec.kind,
                "method": spec.method,
                "level": spec.level,
                "K": k,
                "rows": setup["rows"],
                "sparse_tables": setup["sparse"],
                "steps_per_block": steps.get(spec.name),
                "error": None,
            }
            if spec.name in skipped:
                row["error"] = skipped[spec.name]
            elif spec.name in timing.errors:
                row["error"] = timing.errors[spec.name]
            if row["error"] is None and base:
                row.update(ratio_summary(timing.times[spec.name], base))
            if spec.name in syncs:
                sc = syncs[spec.name]
                if isinstance(sc, dict):
                    row["syncs_per_backward"] = sc["total"]
                    row["syncs_by_name"] = sc["by_name"]
                elif isinstance(sc, str):
                    row["syncs_error"] = sc
            rows.append(row)
        del modes, group, timing
    del embedding
    return {
        "title": SECTION_TITLES[section],
        "device": cfg.device,
        "model": cfg.to_dict(),
        "rows_per_table": setup["rows"],
        "sparse_tables": setup["sparse"],
        "tasks": setup["tasks"],
        "repeats": setup["repeats"],
        "steps_per_block": setup["steps"],
        "modes": [s.to_dict() for s in specs],
        "results": rows,
    }


# ---------------------------------------------------------------------------- memory children
def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


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
    import resource

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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "peak_kb": peak,
            "build_peak_kb": None,
            "rss_before_steps_kb": None,
            "steps_peak_kb": None,
            "ms_per_step": 1000 * dt,
            "source": "ru_maxrss",
        }
    return {
        "peak_kb": max(build_peak, steps_peak),
        "build_peak_kb": build_peak,
        "rss_before_steps_kb": rss_before,
        "steps_peak_kb": steps_peak if reset else None,
        "ms_per_step": 1000 * dt,
        "source": "VmHWM",
    }


def run_memory_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`memory_child` in a fresh interpreter; ``{"error": ...}`` on failure."""
    env = dict(os.environ)
    root = str(_repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "experiments.bench_child", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return {"error": f"child failed (exit {proc.returncode}): {tail[0][:300]}"}


def _memory_plan(
    section: str, data: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Any], int, dict[str, dict[str, Any]], list[str]]:
    """The K, the result rows at that K and the modes (plain first) whose memory is measured."""
    setup = _section_setup(section, args)
    k = args.memory_tasks if section != "h2h" else max(setup["tasks"])
    if k not in setup["tasks"]:
        k = max(setup["tasks"])
    rows = {r["mode"]: r for r in data["results"] if r["K"] == k}
    names = [n for n in rows if rows[n].get("error") is None]
    chosen = _memory_selection(section, names, args)
    if chosen and "plain" not in chosen:
        chosen.insert(0, "plain")
    return setup, k, rows, chosen


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


def run_memory(
    sections: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Callable[..., Any],
) -> None:
    """Peak memory per mode at one K per section; fills the result rows.

    CPU: peak RSS of one child process per mode. CUDA: :func:`run_memory_cuda` (in-process,
    ``torch.cuda.max_memory_allocated``). Section ``overhead`` is about time only: skipped.
    """
    if torch.device(cfg.device).type == "cuda":
        run_memory_cuda(sections, args, cfg, progress)
        return
    for section, data in sections.items():
        if section == "overhead":
            continue
        setup, k, rows, chosen = _memory_plan(section, data, args)
        data["memory"] = {"K": k, "steps": args.memory_steps, "modes": chosen}
        if not chosen:
            continue
        bar = progress(total=len(chosen), desc=f"memory {section} K={k}")
        specs = {m["name"]: m for m in data["modes"]}
        results: dict[str, dict[str, Any]] = {}
        for name in chosen:
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
            results[name] = run_memory_child(spec, args.memory_timeout)
            bar.update(1)
        bar.close()
        base = results.get("plain", {})
        for name, res in results.items():
            row = rows[name]
            if "error" in res:
                row["rss_error"] = res["error"]
                continue
            row["rss_mb"] = res["peak_kb"] / 1024.0
            row["rss_source"] = res.get("source")
            if "peak_kb" in base:
                row["rss_ratio"] = res["peak_kb"] / base["peak_kb"]
            inc = _increment(res)
            if inc is not None:
                row["rss_step_mb"] = inc / 1024.0
                b_inc = _increment(base) if base and "error" not in base else None
                if b_inc is not None and b_inc > 0:
                    row["rss_step_ratio"] = inc / b_inc


def cuda_memory_of_mode(
    section: str,
    cfg: BenchModelConfig,
    spec: ModeSpec,
    k: int,
    rows: int,
    sparse: bool,
    embedding: Any,
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


def run_memory_cuda(
    sections: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    progress: Callable[..., Any],
) -> None:
    """Peak CUDA memory per mode (:func:`cuda_memory_of_mode`) at one K per section.

    Same mode selection as the CPU's peak-RSS children (``--memory``, ``--memory-modes``,
    ``--memory-tasks``); fills ``cuda_peak_mb``, ``cuda_peak_ratio`` (over plain),
    ``cuda_step_mb`` (peak minus allocated before the steps) and ``cuda_step_ratio``.
    """
    for section, data in sections.items():
        if section == "overhead":
            continue
        setup, k, rows, chosen = _memory_plan(section, data, args)
        data["memory"] = {
            "K": k,
            "steps": args.memory_steps,
            "modes": chosen,
            "source": "torch.cuda.max_memory_allocated",
        }
        if not chosen:
            continue
        bar = progress(total=len(chosen), desc=f"cuda memory {section} K={k}")
        specs = {m["name"]: ModeSpec.from_dict(m) for m in data["modes"]}
        embedding = make_embedding(cfg, setup["rows"], setup["sparse"], args.seed)
        results: dict[str, dict[str, Any]] = {}
        for name in chosen:
            results[name] = cuda_memory_of_mode(
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
            bar.update(1)
        bar.close()
        del embedding
        gc.collect()
        torch.cuda.empty_cache()
        base = results.get("plain", {})
        for name, res in results.items():
            row = rows[name]
            if "error" in res:
                row["cuda_error"] = res["error"]
                continue
            row["cuda_peak_mb"] = res["peak"] / 2**20
            row["cuda_step_mb"] = (res["peak"] - res["before"]) / 2**20
            if "peak" in base and base["peak"] > 0:
                row["cuda_peak_ratio"] = res["peak"] / base["peak"]
                b_inc = base["peak"] - base["before"]
                if b_inc > 0:
                    row["cuda_step_ratio"] = (res["peak"] - res["before"]) / b_inc


def _mem_view(r: dict[str, Any]) -> dict[str, Any]:
    """A row's peak-memory measurement, CUDA or RSS: mb, ratio, step_mb, step_ratio, error."""
    if any(key.startswith("cuda_") for key in r):
        return {
            "mb": r.get("cuda_peak_mb"),
            "ratio": r.get("cuda_peak_ratio"),
            "step_mb": r.get("cuda_step_mb"),
            "step_ratio": r.get("cuda_step_ratio"),
            "error": r.get("cuda_error"),
        }
    return {
        "mb": r.get("rss_mb"),
        "ratio": r.get("rss_ratio"),
        "step_mb": r.get("rss_step_mb"),
        "step_ratio": r.get("rss_step_ratio"),
        "error": r.get("rss_error"),
    }


def _increment(res: dict[str, Any]) -> int | None:
    """RSS added by the steps: their peak minus the RSS before them (KiB)."""
    if res.get("steps_peak_kb") is None or res.get("rss_before_steps_kb") is None:
        return None
    return int(res["steps_peak_kb"]) - int(res["rss_before_steps_kb"])


# ---------------------------------------------------------------------------- MGDA agreement
def mgda_agreement(
    args: argparse.Namespace, cfg: BenchModelConfig, peers: dict[str, Any]
) -> dict[str, Any]:
    """Our parameter-level MGDA weights vs TorchJD's MGDA weights on the same batch and model."""
    if args.no_peers or not peers["torchjd"]["available"]:
        return {
            "available": False,
            "reason": peers["torchjd"]["reason"] or "peers disabled (--no-peers)",
        }
    from balancers import mgda_weights
    from balancers.registry import make_balancer
    from experiments.bench_peers import torchjd_aggregator, torchjd_backward

    k = max(args.h2h_tasks)
    group = build_group("h2h", cfg, k, args.rows, False, seed=args.seed + 1)
    x, ys = group.next_batch()
    opt = make_balancer("mgda", group.inner, k)
    out = group.model(x)
    opt.zero_grad()
    info = opt.backward(task_losses(out.task_outputs, ys), shared_parameters=group.shared)
    ours = info.weights.detach().to("cpu", torch.float64)
    gram = None if info.gram is None else info.gram.detach().to("cpu", torch.float64)
    res: dict[str, Any] = {"available": True, "K": k, "rows": args.rows, "ours": ours.tolist()}
    for label, options in (
        ("torchjd_default", {}),
        ("torchjd_tight", {"epsilon": 1e-12, "max_iters": 100_000}),
    ):
        group.inner.zero_grad()
        out = group.model(x)
        w = torchjd_backward(
            task_losses(out.task_outputs, ys),
            out.representation,
            group.shared,
            torchjd_aggregator("mgda", **options),
        )
        w64 = w.detach().to("cpu", torch.float64)
        res[label] = {
            "options": options,
            "weights": w64.tolist(),
            "max_abs_diff": float((w64 - ours).abs().max()),
            "objective": float(w64 @ gram @ w64) if gram is not None else None,
        }
    if gram is not None:
        res["objective_ours"] = float(ours @ gram @ ours)
        exact, _ = mgda_weights(gram)
        res["ours_vs_exact_from_gram"] = float((exact - ours).abs().max())
    group.inner.zero_grad()
    return res


# ---------------------------------------------------------------------------- MARIGOLD weights
def marigold_lambda_run(
    args: argparse.Namespace, cfg: BenchModelConfig, progress: Callable[..., Any]
) -> dict[str, Any]:
    """Train with MARIGOLD (parameter level, fd, sparse tables) and compare lam with exact MGDA.

    Every ``--lambda-every`` steps, before MARIGOLD's backward, the exact parameter-level MGDA
    weights of the same batch are computed from the Gram matrix of the per-task gradients
    (tables included, :func:`sparse_aware_gram`); the L1 distance to the lam MARIGOLD applies at
    that step is recorded, and so is the distance of uniform weights (what a fixed equal
    weighting would be) as a yardstick.
    """
    from balancers import mgda_weights
    from balancers.registry import make_balancer

    if "marigold" not in args.balancers:
        return {"skipped": "marigold not in --balancers"}
    runs = []
    embedding = make_embedding(cfg, args.rows, True, args.seed + 2)
    for k in args.lambda_tasks:
        group = build_group(
            "lambda", cfg, k, args.rows, True, embedding=embedding, seed=args.seed + 2
        )
        try:
            opt = make_balancer("marigold", group.inner, k)
        except Exception as exc:  # noqa: BLE001
            runs.append({"K": k, "error": f"{type(exc).__name__}: {exc}"})
            continue
        model = group.model
        record: list[dict[str, Any]] = []
        bar = progress(total=args.lambda_steps, desc=f"marigold lambda K={k}")
        t0 = time.perf_counter()
        error = None
        try:
            for step in range(args.lambda_steps):
                x, ys = group.next_batch()
                out = model(x)
                losses = task_losses(out.task_outputs, ys)
                exact = None
                if step % args.lambda_every == 0 or step == args.lambda_steps - 1:
                    gram = sparse_aware_gram(losses, group.shared).cpu()
                    exact, _ = mgda_weights(gram)
                    exact = exact.detach().to("cpu", torch.float64)
                opt.zero_grad()
                info = opt.backward(
                    losses,
                    shared_parameters=group.shared,
                    closure=lambda x=x, ys=ys, m=model: task_losses(m(x).task_outputs, ys),
                )
                opt.step()
                if exact is not None:
                    lam = info.weights.detach().to("cpu", torch.float64)
                    uniform = torch.full_like(exact, 1.0 / k)
                    record.append(
                        {
                            "step": step,
                            "l1": float((lam - exact).abs().sum()),
                            "l1_uniform": float((uniform - exact).abs().sum()),
                            "lambda": lam.tolist(),
                            "mgda": exact.tolist(),
                            "losses": [float(v) for v in info.losses.tolist()],
                        }
                    )
                bar.update(1)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        bar.close()
        later = [r for r in record if r["step"] > 0] or record
        summary = None
        if later:
            summary = {
                "from_step": later[0]["step"],
                "mean_l1": sum(r["l1"] for r in later) / len(later),
                "mean_l1_uniform": sum(r["l1_uniform"] for r in later) / len(later),
            }
        runs.append(
            {
                "K": k,
                "steps": args.lambda_steps,
                "every": args.lambda_every,
                "seconds": time.perf_counter() - t0,
                "records": record,
                "summary": summary,
                "error": error,
            }
        )
        del group, opt
    return {"rows": args.rows, "level": "parameters", "estimator": "fd", "runs": runs}


# ---------------------------------------------------------------------------- derived tables
def _find(sections: dict[str, Any], section: str, mode: str, k: int) -> dict[str, Any] | None:
    data = sections.get(section)
    if not data:
        return None
    for r in data["results"]:
        if r["mode"] == mode and r["K"] == k and r.get("error") is None and "ratio" in r:
            return r
    return None


def _pair(
    sections: dict[str, Any], section: str, num: str, den: str, k: int
) -> dict[str, Any] | None:
    a, b = _find(sections, section, num, k), _find(sections, section, den, k)
    if a is None or b is None:
        return None
    return ratio_summary([t / 1000 for t in a["times_ms"]], [t / 1000 for t in b["times_ms"]])


def derived_tables(sections: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The two cost claims, MARIGOLD's K-scaling and the diagnostics overhead."""
    out: dict[str, Any] = {"multibalance": [], "mgda_ub": [], "marigold_k": [], "diagnostics": []}
    for k in args.tasks:
        rep = _find(sections, "param", "rep:multibalance", k)
        par = _find(sections, "param", "param:multibalance", k)
        rep_s = _find(sections, "rep", "rep:multibalance", k)
        if rep or par or rep_s:
            out["multibalance"].append(
                {
                    "K": k,
                    "rep_ratio": rep and rep["ratio"],
                    "rep_qps_change": rep and (1 / rep["ratio"] - 1),
                    "param_ratio": par and par["ratio"],
                    "param_qps_change": par and (1 / par["ratio"] - 1),
                    "rep_sparse_ratio": rep_s and rep_s["ratio"],
                    "rep_sparse_qps_change": rep_s and (1 / rep_s["ratio"] - 1),
                }
            )
        pr = _pair(sections, "param", "rep:mgda", "param:mgda", k)
        if pr:
            out["mgda_ub"].append(
                {
                    "K": k,
                    "rep_ms": _find(sections, "param", "rep:mgda", k)["ms_per_step"],  # type: ignore[index]
                    "param_ms": _find(sections, "param", "param:mgda", k)["ms_per_step"],  # type: ignore[index]
                    "time_ratio": pr["ratio"],
                    "time_ratio_min": pr["ratio_min"],
                    "time_ratio_max": pr["ratio_max"],
                    "time_saved": 1 - pr["ratio"],
                    "speedup": 1 / pr["ratio"],
                }
            )
        row: dict[str, Any] = {"K": k}
        for key, sec, mode in (
            ("plain_dense", "param", "plain"),
            ("marigold_dense", "param", "param:marigold"),
            ("mgda_dense", "param", "param:mgda"),
            ("plain_sparse", "rep", "plain"),
            ("marigold_sparse", "rep", "param:marigold"),
            ("marigold_rep_sparse", "rep", "rep:marigold"),
        ):
            r = _find(sections, sec, mode, k)
            if r:
                row[f"{key}_ms"] = r["ms_per_step"]
                row[f"{key}_ratio"] = r["ratio"]
                row[f"{key}_ratio_min"] = r["ratio_min"]
                row[f"{key}_ratio_max"] = r["ratio_max"]
        if len(row) > 1:
            out["marigold_k"].append(row)
        d = _pair(sections, "rep", "rep:mgda+tracker", "rep:mgda", k)
        if d:
            out["diagnostics"].append(
                {
                    "K": k,
                    "overhead": d["ratio"] - 1,
                    "overhead_min": d["ratio_min"] - 1,
                    "overhead_max": d["ratio_max"] - 1,
                    "mgda_ms": _find(sections, "rep", "rep:mgda", k)["ms_per_step"],  # type: ignore[index]
                    "tracker_ms": _find(sections, "rep", "rep:mgda+tracker", k)["ms_per_step"],
                }
            )  # type: ignore[index]
    h2h = []
    for k in args.h2h_tasks:
        entry: dict[str, Any] = {"K": k}
        for label, mode in (("param", "param:mgda"), ("rep", "rep:mgda")):
            pr = _pair(sections, "h2h", "torchjd:mgda:emb", mode, k)
            if pr:
                entry[f"speedup_vs_{label}"] = pr["ratio"]
                entry[f"speedup_vs_{label}_min"] = pr["ratio_min"]
                entry[f"speedup_vs_{label}_max"] = pr["ratio_max"]
        for mode in ("plain", "param:mgda", "rep:mgda", "torchjd:mgda:emb", "torchjd:mgda:noemb"):
            r = _find(sections, "h2h", mode, k)
            if r:
                entry[f"{mode}_ms"] = r["ms_per_step"]
        if len(entry) > 1:
            h2h.append(entry)
    out["h2h"] = h2h
    return out


def _fmt_x(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}x"


def _budget_item(
    item: str, budget: str, measured: str = "–", met: bool | None = None
) -> dict[str, Any]:
    """One row of the budget table (``met=None``: not measured in this run)."""
    return {"item": item, "budget": budget, "measured": measured, "met": met}


def budget_table(
    sections: dict[str, Any],
    derived: dict[str, Any],
    agreement: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """DESIGN.md's performance budget against the measurements of this run."""
    items: list[dict[str, Any]] = []
    # 1. representation-level step
    worst: tuple[float, str, int] | None = None
    for r in sections.get("rep", {}).get("results", []):
        if (
            r["level"] == "representation"
            and r["method"] in REP_BUDGET_METHODS
            and r["kind"] == "ours"
            and "ratio" in r
        ):
            if worst is None or r["ratio"] > worst[0]:
                worst = (r["ratio"], r["mode"], r["K"])
    items.append(
        _budget_item(
            "representation-level step (MGDA-UB, MultiBalance, GradOPS, PCGrad) vs plain",
            "<= 1.10x",
            "–"
            if worst is None
            else f"worst median {worst[0]:.3f}x ({worst[1]}, K={worst[2]}; sparse tables, {args.rows} rows)",
            None if worst is None else worst[0] <= 1.10,
        )
    )
    # 2. MARIGOLD at 16 tasks, flat in K: the representation level (the toolkit's default
    # balance point; the extra forward runs the heads only) and the parameter level (the extra
    # forward runs the whole model)
    for key, label in (
        ("marigold_rep_sparse_ratio", "representation level"),
        ("marigold_sparse_ratio", "parameter level"),
    ):
        mk = [r for r in derived["marigold_k"] if r.get(key) is not None]
        if not mk:
            items.append(
                _budget_item(
                    f"MARIGOLD step ({label}, fd) with 16 tasks vs plain", "<= 1.3x, flat in K"
                )
            )
            continue
        last = max(mk, key=lambda r: r["K"])
        ratios = [r[key] for r in mk]
        spread = max(ratios) / min(ratios)
        items.append(
            _budget_item(
                f"MARIGOLD step ({label}, fd) with {last['K']} tasks vs plain, flat in K",
                "<= 1.3x, flat in K",
                f"{last[key]:.3f}x at K={last['K']}; max/min over K = {spread:.2f} "
                f"(flat means <= {FLAT_TOLERANCE})",
                last[key] <= 1.3 and spread <= FLAT_TOLERANCE,
            )
        )
    # 3. memory
    mem = [
        r
        for r in sections.get("rep", {}).get("results", [])
        if r["level"] == "representation"
        and r["kind"] == "ours"
        and _mem_view(r)["ratio"] is not None
    ]
    if mem:
        w = max(mem, key=lambda r: _mem_view(r)["ratio"])
        wv = _mem_view(w)
        what = "torch.cuda.max_memory_allocated" if "cuda_peak_ratio" in w else "peak-RSS"
        items.append(
            _budget_item(
                "peak memory, representation level vs plain",
                "<= 1.1x",
                f"worst {what} ratio {wv['ratio']:.3f}x ({w['mode']}, K={w['K']}, "
                f"{args.rows}-row sparse tables); its steps add "
                f"{_num(wv['step_mb'], '{:.0f}')} MB vs plain's "
                f"{_num(_plain_step_mb(sections, 'rep', w['K']), '{:.0f}')} MB",
                wv["ratio"] <= 1.1,
            )
        )
    else:
        items.append(_budget_item("peak memory, representation level vs plain", "<= 1.1x"))
    # 4. TorchJD
    h2h = [e for e in derived.get("h2h", []) if "speedup_vs_param" in e]
    if h2h and agreement.get("available"):
        e = h2h[-1]
        diff = agreement["torchjd_default"]["max_abs_diff"]
        items.append(
            _budget_item(
                f"vs TorchJD mtl_backward + MGDA ({args.rows}-row tables, K={e['K']}), same "
                "MGDA weights",
                ">= 5x faster",
                f"parameter-level MGDA (same weights up to {diff:.1e}): "
                f"{e['speedup_vs_param']:.2f}x; MGDA-UB (representation level, other "
                f"weights): {e.get('speedup_vs_rep', math.nan):.2f}x",
                e["speedup_vs_param"] >= 5,
            )
        )
    else:
        items.append(
            _budget_item(
                "vs TorchJD mtl_backward + MGDA",
                ">= 5x faster",
                "– (TorchJD not available or h2h not run)",
            )
        )
    # 4b. the same comparison with the tables declared sparse (TorchJD cannot take sparse
    # gradients): our exact parameter-level MGDA on the same model function, same weights
    if h2h and agreement.get("available"):
        e = h2h[-1]
        ours = _find(sections, "rep", "param:mgda", e["K"])
        theirs = e.get("torchjd:mgda:emb_ms")
        if ours and ours.get("ms_per_step") and theirs:
            speedup = theirs / ours["ms_per_step"]
            items.append(
                _budget_item(
                    f"vs TorchJD mtl_backward + MGDA ({args.rows}-row tables, K={e['K']}), "
                    "same MGDA weights, our tables sparse",
                    ">= 5x faster",
                    f"{ours['ms_per_step']:.1f} ms (ours, sparse tables, section rep) vs "
                    f"{theirs:.1f} ms (TorchJD, dense tables, section h2h): {speedup:.1f}x "
                    "(across sections, not interleaved)",
                    speedup >= 5,
                )
            )
    # 5. diagnostics
    diag = derived["diagnostics"]
    if diag:
        w = max(diag, key=lambda r: r["overhead"])
        items.append(
            _budget_item(
                "diagnostics every 10 steps (ConflictTracker fed from BalanceInfo)",
                "<= 5 % overhead",
                f"worst median overhead {100 * w['overhead']:+.1f} % (K={w['K']}; "
                f"per-K: " + ", ".join(f"{100 * d['overhead']:+.1f} %" for d in diag) + ")",
                w["overhead"] <= 0.05,
            )
        )
    else:
        items.append(_budget_item("diagnostics every 10 steps", "<= 5 % overhead"))
    items += _overhead_budget(sections, args)
    if torch.device(args.device).type == "cuda":
        items += _gpu_budget(sections, derived, args)
    return items


def _overhead_budget(sections: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Section ``overhead``: MGDA's ratio at K=4 and the host syncs per backward."""
    k, limit = OVERHEAD_BUDGET
    dev = "CPU" if torch.device(args.device).type == "cpu" else "CUDA"
    label = f"{dev} overhead section: representation-level MGDA <= {limit}x plain at K={k}"
    if "overhead" not in sections:
        return [_budget_item(label, f"<= {limit}x", "– (section overhead not run)")]
    r = _find(sections, "overhead", "rep:mgda", k)
    if r is None:
        item = _budget_item(label, f"<= {limit}x", f"– (rep:mgda at K={k} not measured)")
    else:
        item = _budget_item(
            label,
            f"<= {limit}x",
            f"{r['ratio']:.3f}x [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}] "
            f"({r['ms_per_step']:.2f} ms vs plain's "
            f"{_find(sections, 'overhead', 'plain', k)['ms_per_step']:.2f} ms; "  # type: ignore[index]
            f"{r.get('steps_per_block')} steps per block)",
            r["ratio"] <= limit,
        )
    out = [item]
    counted = [
        r
        for r in sections["overhead"]["results"]
        if r["kind"] == "ours" and r.get("syncs_per_backward") is not None
    ]
    sync_label = (
        "host synchronizations inside one steady-state backward (item/tolist/bool/float/int/"
        "cpu/numpy/nonzero calls; overhead section, every balancer, representation level)"
    )
    if counted:
        w = max(counted, key=lambda r: (r["syncs_per_backward"], r["K"]))
        per_mode: dict[str, int] = {}
        for r in counted:
            per_mode[r["mode"]] = max(per_mode.get(r["mode"], 0), r["syncs_per_backward"])
        out.append(
            _budget_item(
                sync_label,
                "<= 1",
                f"worst {w['syncs_per_backward']} ({w['mode']}, K={w['K']}: "
                f"{w.get('syncs_by_name') or {}}); max per mode over K: "
                + ", ".join(f"{m} {n}" for m, n in per_mode.items()),
                w["syncs_per_backward"] <= 1,
            )
        )
    else:
        out.append(_budget_item(sync_label, "<= 1"))
    return out


def _gpu_budget(
    sections: dict[str, Any], derived: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The two GPU lines of the budget (``--device cuda`` only): section rep's representation-level
    ratios against 1.10x (K <= 8) / 1.2x (K = 16), and exact parameter-level MGDA against TorchJD
    (section h2h, same model and weights)."""
    gpu = torch.cuda.get_device_name(torch.device(args.device))
    items: list[dict[str, Any]] = []
    rs = [
        r
        for r in sections.get("rep", {}).get("results", [])
        if r["level"] == "representation"
        and r["method"] in REP_BUDGET_METHODS
        and r["kind"] == "ours"
        and "ratio" in r
    ]
    label = f"on {gpu}: representation-level step (MGDA-UB, MultiBalance, GradOPS, PCGrad) vs plain"
    if rs:
        parts, met = [], True
        for lo, hi, limit in ((1, 8, 1.10), (9, 10**9, 1.2)):
            sub = [r for r in rs if lo <= r["K"] <= hi]
            if sub:
                w = max(sub, key=lambda r: r["ratio"])
                parts.append(
                    f"K {'<= 8' if hi == 8 else '> 8'}: worst {w['ratio']:.3f}x "
                    f"({w['mode']}, K={w['K']})"
                )
                met = met and w["ratio"] <= limit
        items.append(
            _budget_item(
                label,
                "<= 1.10x at K <= 8, <= 1.2x at K = 16",
                "; ".join(parts) + f" (sparse tables, {args.rows} rows, dim {args.dim})",
                met,
            )
        )
    else:
        items.append(_budget_item(label, "<= 1.10x at K <= 8, <= 1.2x at K = 16"))
    h2h = [e for e in derived.get("h2h", []) if "speedup_vs_param" in e]
    label = f"on {gpu}: exact parameter-level MGDA vs TorchJD mtl_backward + MGDA, same model"
    if h2h:
        e = h2h[-1]
        items.append(
            _budget_item(
                label,
                ">= 2x faster",
                f"{e.get('param:mgda_ms', math.nan):.1f} ms vs "
                f"{e.get('torchjd:mgda:emb_ms', math.nan):.1f} ms: {e['speedup_vs_param']:.2f}x "
                f"[{e['speedup_vs_param_min']:.2f}–{e['speedup_vs_param_max']:.2f}] (K={e['K']}, "
                f"{args.rows}-row dense tables, section h2h)",
                e["speedup_vs_param"] >= 2,
            )
        )
    else:
        items.append(
            _budget_item(label, ">= 2x faster", "– (TorchJD not available or h2h not run)")
        )
    return items


def _plain_step_mb(sections: dict[str, Any], section: str, k: int) -> float | None:
    for r in sections.get(section, {}).get("results", []):
        if r["mode"] == "plain" and r["K"] == k:
            return _mem_view(r)["step_mb"]
    return None


# ---------------------------------------------------------------------------- report
def _ratio_cell(r: dict[str, Any]) -> str:
    if r.get("error"):
        return "error"
    if "ratio" not in r or r["ratio"] is None or math.isnan(r["ratio"]):
        return "–"
    return f"{r['ratio']:.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}]"


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def render_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    meta = results["meta"]
    lines = ["# Benchmark results", ""]
    lines.append(f"Command: `{meta['command']}`  ")
    lines.append(f"Machine: {meta['machine']['summary']}  ")
    la = meta["machine"]
    lines.append(f"Load average before: {la['loadavg_before']}, after: {la['loadavg_after']}  ")
    lines.append(f"Wall time: {meta['elapsed_s']:.0f} s  ")
    device = meta.get("device", "cpu")
    cuda = torch.device(device).type == "cuda"
    lines.append(f"Device: {meta['machine'].get('device_summary', device)}  ")
    c = meta["model"]
    lines.append(
        f"Model: SharedBottom, {c['fields']} fields x table(rows) x {c['dim']}, {c['numeric']} "
        f"numeric, bottom {'-'.join(map(str, c['bottom']))}, tower {'-'.join(map(str, c['tower']))}, "
        f"batch {c['batch_size']}; Adam (dense) + {c['table_optimizer']} (tables)"
    )
    lines.append("")
    for key, p in results["peers"].items():
        if not p["available"]:
            lines.append(f"> note: {key} not available ({p['reason']})")
    lines.append("")
    if cuda:
        lines.append(
            "Ratio = median over rounds of (mode's time per step / plain step's time in the same "
            "round) [min–max]; ms/step = median; every timed block is bracketed by "
            "`torch.cuda.synchronize()`. Peak CUDA MB (memory K only): "
            "`torch.cuda.max_memory_allocated` over the mode's measured steps (fresh model and "
            "optimizer around the section's tables, one warm-up step, then "
            "`reset_peak_memory_stats`), ratio to plain's; step Δ = that peak minus the memory "
            "allocated before the steps (ratio to plain's Δ)."
        )
    else:
        lines.append(
            "Ratio = median over rounds of (mode's time per step / plain step's time in the same "
            "round) [min–max]; ms/step = median. Peak RSS (memory K only): `VmHWM` of a fresh "
            "child process that builds the model and runs the mode, ratio to the plain child; "
            "step Δ = peak RSS during the steps minus RSS before them (ratio to plain's Δ)."
        )
    lines.append("")
    for section, data in results["sections"].items():
        if section == "overhead":
            lines += _overhead_markdown(data)
            continue
        mem_k = data.get("memory", {}).get("K")
        lines.append(
            f"## Section `{section}`: {data['title']} ({data['rows_per_table']} rows per "
            f"table; {data['repeats']} rounds x {data['steps_per_block']} steps)"
        )
        lines.append("")
        if cuda:
            lines.append(
                "| mode | level | K | ratio [min–max] | ms/step | peak CUDA MB | CUDA mem ratio | "
                "step Δ MB (ratio) | note |"
            )
        else:
            lines.append(
                "| mode | level | K | ratio [min–max] | ms/step | peak RSS MB | RSS ratio | "
                "step Δ MB (ratio) | note |"
            )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in data["results"]:
            mv = _mem_view(r)
            note = r.get("error") or mv["error"] or ""
            mem = r["K"] == mem_k
            delta = ""
            if mem and mv["step_mb"] is not None:
                delta = f"{mv['step_mb']:.0f}"
                if mv["step_ratio"] is not None:
                    delta += f" ({mv['step_ratio']:.2f}x)"
            elif mem:
                delta = "–"
            lines.append(
                f"| {r['mode']} | {r['level']} | {r['K']} | {_ratio_cell(r)} | "
                f"{_num(r.get('ms_per_step'))} | {_num(mv['mb'], '{:.0f}') if mem else ''} | "
                f"{_num(mv['ratio'], '{:.3f}') if mem else ''} | {delta} | {note[:120]} |"
            )
        lines.append("")
    d = results["derived"]
    if d["multibalance"]:
        lines.append(
            "## Claim: MultiBalance (representation level ≈ neutral throughput, parameter level "
            "loses 70–80 %)"
        )
        lines.append("")
        lines.append(
            "| K | rep. level, dense tables: ratio (QPS change) | param. level, dense tables: ratio "
            "(QPS change) | rep. level, sparse tables: ratio (QPS change) |"
        )
        lines.append("|---|---|---|---|")
        for r in d["multibalance"]:

            def cell(a: str, b: str, r: dict[str, Any] = r) -> str:
                return "–" if r[a] is None else f"{r[a]:.2f}x ({100 * r[b]:+.0f} %)"

            lines.append(
                f"| {r['K']} | {cell('rep_ratio', 'rep_qps_change')} | "
                f"{cell('param_ratio', 'param_qps_change')} | "
                f"{cell('rep_sparse_ratio', 'rep_sparse_qps_change')} |"
            )
        lines.append("")
    if d["mgda_ub"]:
        lines.append(
            "## Claim: MGDA-UB (time saved vs parameter-level MGDA as K grows; dense tables)"
        )
        lines.append("")
        lines.append(
            "| K | MGDA-UB ms | MGDA (param.) ms | time ratio [min–max] | time saved | speed-up |"
        )
        lines.append("|---|---|---|---|---|---|")
        for r in d["mgda_ub"]:
            lines.append(
                f"| {r['K']} | {r['rep_ms']:.1f} | {r['param_ms']:.1f} | {r['time_ratio']:.3f} "
                f"[{r['time_ratio_min']:.3f}–{r['time_ratio_max']:.3f}] | "
                f"{100 * r['time_saved']:.0f} % | {r['speedup']:.1f}x |"
            )
        lines.append("")
    if d["marigold_k"]:
        lines.append("## MARIGOLD K-scaling (parameter level, fd estimator, one extra forward)")
        lines.append("")
        lines.append(
            "| K | plain (dense) ms | MARIGOLD (dense) ratio | MGDA param. (dense) ratio | "
            "plain (sparse) ms | MARIGOLD param. (sparse) ratio | MARIGOLD rep. (sparse) ratio |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for r in d["marigold_k"]:

            def rc(key: str, r: dict[str, Any] = r) -> str:
                if f"{key}_ratio" not in r:
                    return "–"
                return f"{r[key + '_ratio']:.3f} [{r[key + '_ratio_min']:.3f}–{r[key + '_ratio_max']:.3f}]"

            lines.append(
                f"| {r['K']} | {_num(r.get('plain_dense_ms'))} | {rc('marigold_dense')} | "
                f"{rc('mgda_dense')} | {_num(r.get('plain_sparse_ms'))} | "
                f"{rc('marigold_sparse')} | {rc('marigold_rep_sparse')} |"
            )
        lines.append("")
    lam = results.get("marigold_lambda", {})
    if lam.get("runs"):
        lines.append(
            "## MARIGOLD λ vs exact MGDA weights along training (parameter level, sparse tables)"
        )
        lines.append("")
        lines.append("| K | step | L1(λ, MGDA) | L1(uniform, MGDA) |")
        lines.append("|---|---|---|---|")
        for run in lam["runs"]:
            if run.get("error") and not run.get("records"):
                lines.append(f"| {run['K']} | error: {run['error'][:100]} | | |")
                continue
            for rec in run["records"]:
                lines.append(
                    f"| {run['K']} | {rec['step']} | {rec['l1']:.3f} | {rec['l1_uniform']:.3f} |"
                )
            if run.get("summary"):
                sm = run["summary"]
                lines.append(
                    f"| {run['K']} | mean over steps ≥ {sm['from_step']} | "
                    f"**{sm['mean_l1']:.3f}** | **{sm['mean_l1_uniform']:.3f}** |"
                )
        lines.append("")
    if d["diagnostics"]:
        lines.append(
            "## Diagnostics overhead: ConflictTracker(every=10) fed from BalanceInfo (MGDA-UB)"
        )
        lines.append("")
        lines.append("| K | MGDA-UB ms | + tracker ms | overhead median [min–max] |")
        lines.append("|---|---|---|---|")
        for r in d["diagnostics"]:
            lines.append(
                f"| {r['K']} | {r['mgda_ms']:.1f} | {r['tracker_ms']:.1f} | "
                f"{100 * r['overhead']:+.1f} % [{100 * r['overhead_min']:+.1f}, "
                f"{100 * r['overhead_max']:+.1f}] |"
            )
        lines.append("")
    ag = results.get("mgda_agreement", {})
    lines.append(
        "## MGDA weights: ours (parameter level, exact solver) vs TorchJD MGDA, same batch"
    )
    lines.append("")
    if ag.get("available"):
        lines.append(
            f"K={ag['K']}, {ag['rows']}-row tables. Ours: "
            f"{[round(v, 4) for v in ag['ours']]}, objective wᵀMw = "
            f"{ag.get('objective_ours', math.nan):.6g}"
        )
        lines.append("")
        lines.append("| TorchJD MGDA | weights | max abs diff | objective wᵀMw |")
        lines.append("|---|---|---|---|")
        for label in ("torchjd_default", "torchjd_tight"):
            e = ag[label]
            lines.append(
                f"| {label} {e['options'] or '(epsilon=1e-3, max_iters=100)'} | "
                f"{[round(v, 4) for v in e['weights']]} | {e['max_abs_diff']:.2e} | "
                f"{_num(e['objective'], '{:.6g}')} |"
            )
    else:
        lines.append(f"not measured: {ag.get('reason')}")
    lines.append("")
    if d.get("h2h"):
        lines.append("## Head-to-head: TorchJD mtl_backward + MGDA vs ours")
        lines.append("")
        lines.append(
            "| K | plain ms | ours param. ms | MGDA-UB ms | TorchJD (tables in) ms | TorchJD (tables out) ms | "
            "speed-up param. [min–max] | speed-up MGDA-UB [min–max] |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for e in d["h2h"]:

            def sp(label: str, e: dict[str, Any] = e) -> str:
                k = f"speedup_vs_{label}"
                return (
                    "–" if k not in e else f"{e[k]:.2f}x [{e[k + '_min']:.2f}–{e[k + '_max']:.2f}]"
                )

            lines.append(
                f"| {e['K']} | {_num(e.get('plain_ms'))} | {_num(e.get('param:mgda_ms'))} | "
                f"{_num(e.get('rep:mgda_ms'))} | {_num(e.get('torchjd:mgda:emb_ms'))} | "
                f"{_num(e.get('torchjd:mgda:noemb_ms'))} | {sp('param')} | {sp('rep')} |"
            )
        lines.append("")
    lines.append("## Performance budget (DESIGN.md)")
    lines.append("")
    lines.append("| item | budget | measured | met |")
    lines.append("|---|---|---|---|")
    for b in results["budget"]:
        met = "–" if b["met"] is None else ("yes" if b["met"] else "**no**")
        lines.append(f"| {b['item']} | {b['budget']} | {b['measured']} | {met} |")
    lines.append("")
    return "\n".join(lines)


def _overhead_markdown(data: dict[str, Any]) -> list[str]:
    """Section ``overhead``: its model, then ratio, ms/step and syncs per backward per mode."""
    c = data.get("model") or {}
    lines = [
        f"## Section `overhead`: {data['title']} ({data['repeats']} rounds x "
        f"{data['steps_per_block']} steps)",
        "",
        f"Model: {c.get('fields')} dense tables of {data['rows_per_table']} x {c.get('dim')}, "
        f"{c.get('numeric')} numeric, bottom {'-'.join(map(str, c.get('bottom', ())))}, towers "
        f"{'-'.join(map(str, c.get('tower', ())))}, batch {c.get('batch_size')}; device "
        f"{data.get('device', 'cpu')}. syncs/backward: calls of item, tolist, `__bool__`, "
        "`__float__`, `__int__`, cpu, numpy, nonzero inside one untimed `backward` after the "
        "timed rounds (`experiments/bench_syncs.py`).",
        "",
        "| mode | level | K | ratio [min–max] | ms/step | syncs/backward | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        note = r.get("error") or r.get("syncs_error") or ""
        by_name = r.get("syncs_by_name")
        if by_name:
            note = (note + " " if note else "") + ", ".join(f"{k} {v}" for k, v in by_name.items())
        lines.append(
            f"| {r['mode']} | {r['level']} | {r['K']} | {_ratio_cell(r)} | "
            f"{_num(r.get('ms_per_step'), '{:.3f}')} | "
            f"{_num(r.get('syncs_per_backward'), '{:d}')} | {note[:120]} |"
        )
    lines.append("")
    return lines


def make_plots(results: dict[str, Any], out: Path) -> list[str]:
    """``bench_ratios.png`` (ratio vs K per mode) and ``bench_marigold.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    secs = [s for s in ("rep", "param") if s in results["sections"]]
    if secs:
        fig, axes = plt.subplots(1, len(secs), figsize=(7 * len(secs), 5), squeeze=False)
        colors = plt.get_cmap("tab20").colors
        for ax, sec in zip(axes[0], secs):
            ax.set_prop_cycle(color=colors)
            data = results["sections"][sec]
            by_mode: dict[str, list[dict[str, Any]]] = {}
            for r in data["results"]:
                if "ratio" in r and r.get("error") is None:
                    by_mode.setdefault(r["mode"], []).append(r)
            for mode, rs in by_mode.items():
                rs = sorted(rs, key=lambda r: r["K"])
                ks = [r["K"] for r in rs]
                med = [r["ratio"] for r in rs]
                lo = [r["ratio"] - r["ratio_min"] for r in rs]
                hi = [r["ratio_max"] - r["ratio"] for r in rs]
                style = "--" if mode.startswith(("torchjd", "rechub")) else "-"
                ax.errorbar(
                    ks, med, yerr=[lo, hi], marker="o", linestyle=style, capsize=3, label=mode
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(data["tasks"])
            ax.set_xticklabels([str(k) for k in data["tasks"]])
            if sec == "param":
                ax.set_yscale("log")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xlabel("K (tasks)")
            ax.set_ylabel("step time / plain step (median, min–max)")
            ax.set_title(f"{sec}: {data['title']} ({data['rows_per_table']} rows)")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / "bench_ratios.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    mk = results["derived"]["marigold_k"]
    lam = results.get("marigold_lambda", {}).get("runs", [])
    if mk or lam:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        ax = axes[0]
        for key, label in (
            ("marigold_sparse", "MARIGOLD param. (sparse tables)"),
            ("marigold_dense", "MARIGOLD param. (dense tables)"),
            ("mgda_dense", "MGDA param. (dense tables)"),
            ("marigold_rep_sparse", "MARIGOLD rep. (sparse tables)"),
        ):
            pts = [(r["K"], r[f"{key}_ratio"]) for r in mk if f"{key}_ratio" in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(1.3, color="red", linewidth=0.8, linestyle=":", label="budget 1.3x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (tasks)")
        ax.set_ylabel("step time / plain step")
        ax.set_title("MARIGOLD K-scaling")
        ax.legend(fontsize=8)
        ax = axes[1]
        for run in lam:
            recs = run.get("records") or []
            if recs:
                ax.plot(
                    [r["step"] for r in recs],
                    [r["l1"] for r in recs],
                    marker="o",
                    label=f"K={run['K']}: MARIGOLD λ",
                )
                ax.plot(
                    [r["step"] for r in recs],
                    [r["l1_uniform"] for r in recs],
                    linestyle=":",
                    label=f"K={run['K']}: uniform",
                )
        ax.set_xlabel("training step")
        ax.set_ylabel("L1 distance to exact MGDA weights")
        ax.set_title("MARIGOLD λ vs exact MGDA (parameter level)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "bench_marigold.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


# ---------------------------------------------------------------------------- driver
def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> None, inf -> "inf", tuples -> lists."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _machine(before: str, device: str = "cpu") -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ncpu = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    device_summary = "cpu"
    gpu: dict[str, Any] | None = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
        }
        device_summary = f"{device}: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return {
        "device": device,
        "device_summary": device_summary,
        "gpu": gpu,
        "cpu": cpu,
        "cpu_count": ncpu,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": before,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "summary": f"{cpu}, {ncpu} CPUs, {mem:.0f} GiB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
        if mem
        else f"{cpu}, {ncpu} CPUs, torch {torch.__version__}",
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`); exit status."""
    t_start = time.perf_counter()
    try:
        args = _resolve(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = args.quiet

    def progress(total: int, desc: str) -> Any:
        if quiet:
            return _NullBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)

    load_before = _loadavg()
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) / 2
    except OSError:
        busy = False
    if busy and torch.get_num_threads() > 1 and not quiet:
        print(
            f"note: load average {load_before} on {os.cpu_count()} CPUs with "
            f"{torch.get_num_threads()} torch threads: OpenMP threads that spin-wait for a "
            "busy core can make steps 10-20x slower; consider --threads 1 (or "
            "OMP_WAIT_POLICY=PASSIVE)",
            file=sys.stderr,
        )
    peers = peer_status()
    if not args.no_peers:
        for key, p in peers.items():
            if not p["available"]:
                print(
                    f"note: {key} is not installed, its side-by-side rows are skipped. "
                    f"Install the bench extra: {INSTALL_HINT}",
                    file=sys.stderr,
                )
    cfg = _model_config(args)
    phases: dict[str, float] = {}
    sections: dict[str, dict[str, Any]] = {}
    for section in args.sections:
        t0 = time.perf_counter()
        sections[section] = run_section(
            section, args, _section_config(section, args, cfg), peers, progress
        )
        phases[f"section {section}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lambda_run = marigold_lambda_run(args, cfg, progress)
    phases["marigold lambda"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    agreement = (
        mgda_agreement(args, cfg, peers)
        if "h2h" in args.sections
        else {"available": False, "reason": "section h2h not run"}
    )
    phases["mgda agreement"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.memory != "none" or args.memory_modes:
        run_memory(sections, args, cfg, progress)
    phases["memory"] = time.perf_counter() - t0
    derived = derived_tables(sections, args)
    budget = budget_table(sections, derived, agreement, args)
    argv = getattr(args, "_argv", None)
    if argv is None:  # dispatched by `python -m experiments bench ...`
        argv = sys.argv[1:]
        if argv and argv[0] == "bench":
            argv = argv[1:]
    results: dict[str, Any] = {
        "meta": {
            "command": "python -m experiments bench " + " ".join(argv or []),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": args.device,
            "machine": _machine(load_before, args.device),
            "model": cfg.to_dict(),
            "options": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "elapsed_s": 0.0,
            "phases_s": phases,
        },
        "peers": peers,
        "sections": sections,
        "derived": derived,
        "marigold_lambda": lambda_run,
        "mgda_agreement": agreement,
        "budget": budget,
    }
    results["meta"]["machine"]["loadavg_after"] = _loadavg()
    results["meta"]["elapsed_s"] = time.perf_counter() - t_start
    if not args.no_plots:
        try:
            results["meta"]["plots"] = make_plots(results, out)
        except Exception as exc:  # noqa: BLE001 - plots are a convenience
            results["meta"]["plots_error"] = f"{type(exc).__name__}: {exc}"
    md = render_markdown(results)
    (out / "results.md").write_text(md, encoding="utf-8")
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)
    if not quiet:
        print(md)
        print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments bench",
        description="Step time and peak memory of every balancer vs a plain summed-loss step.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m experiments.bench [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
