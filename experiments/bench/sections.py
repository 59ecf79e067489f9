"""Sections: the modes of each section, its set-up, and its interleaved timing run per K.

* ``rep``: sparse tables, every balancer of ``--balancers`` at the representation level,
  MARIGOLD and exact MGDA at the parameter level, MGDA-UB with a ``ConflictTracker``;
* ``param``: dense tables, every balancer of ``--balancers`` at the parameter level, MGDA-UB and
  MultiBalance at the representation level, the peers (TorchJD, torch-rechub);
* ``h2h``: dense tables, our MGDA against TorchJD's;
* ``overhead``: the small model of :data:`~experiments.bench.model.OVERHEAD_MODEL`, every
  balancer at the representation level, plus the host syncs per backward.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from experiments.bench.model import (
    OVERHEAD_MODEL,
    BenchModelConfig,
    Group,
    build_group,
    make_embedding,
)
from experiments.bench.modes import (
    ModeSpec,
    count_backward_syncs,
    make_mode,
    uses_task_gradients,
)
from experiments.bench.peers import TORCHJD_AGGREGATORS
from experiments.bench.progress import Progress
from experiments.bench.timing import TimingResult, device_clock, interleaved_timings, ratio_summary
from mtl.models._layers import FeatureEmbedding

__all__ = [
    "SECTION_TITLES",
    "memory_guard",
    "run_section",
    "section_modes",
    "section_setup",
]

SECTION_TITLES = {
    "rep": "representation level, sparse tables",
    "param": "parameter level, dense tables",
    "h2h": "head-to-head with TorchJD, dense tables",
    "overhead": "per-operation overhead, small model",
}


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


def _torchjd(aggregator: str, include_embeddings: bool) -> ModeSpec:
    return ModeSpec(
        name=f"torchjd:{aggregator}:{'emb' if include_embeddings else 'noemb'}",
        kind="torchjd",
        method=aggregator,
        level="parameters",
        include_embeddings=include_embeddings,
    )


def _rep_modes(bal: list[str], args: argparse.Namespace) -> list[ModeSpec]:
    modes = [_ours(b, "representation") for b in bal]
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
    return modes


def _param_modes(bal: list[str], args: argparse.Namespace, peers: dict[str, Any]) -> list[ModeSpec]:
    modes = [_ours(b, "parameters") for b in bal]
    modes += [_ours(b, "representation") for b in ("mgda", "multibalance") if b in bal]
    if not args.no_peers and peers["torchjd"]["available"]:
        for agg in TORCHJD_AGGREGATORS:
            for emb in (True, False):
                modes.append(_torchjd(agg, emb))
    if not args.no_peers and peers["rechub"]["available"]:
        modes.append(
            ModeSpec(
                name="rechub:metabalance",
                kind="rechub",
                method="metabalance",
                level="parameters",
            )
        )
    return modes


def _h2h_modes(bal: list[str], args: argparse.Namespace, peers: dict[str, Any]) -> list[ModeSpec]:
    modes: list[ModeSpec] = []
    if "mgda" in bal:
        modes += [_ours("mgda", "parameters"), _ours("mgda", "representation")]
    if not args.no_peers and peers["torchjd"]["available"]:
        modes += [_torchjd("mgda", True), _torchjd("mgda", False)]
    return modes


def section_modes(section: str, args: argparse.Namespace, peers: dict[str, Any]) -> list[ModeSpec]:
    """The modes of one section, plain first."""
    bal = args.balancers
    modes = [ModeSpec(name="plain", kind="plain")]
    if section == "rep":
        modes += _rep_modes(bal, args)
    elif section == "param":
        modes += _param_modes(bal, args, peers)
    elif section == "h2h":
        modes += _h2h_modes(bal, args, peers)
    elif section == "overhead":
        modes += [_ours(b, "representation") for b in bal]
    return modes


def _setup(rows: int, sparse: bool, tasks: list[int], repeats: int, steps: int) -> dict[str, Any]:
    return {"rows": rows, "sparse": sparse, "tasks": tasks, "repeats": repeats, "steps": steps}


def section_setup(section: str, args: argparse.Namespace) -> dict[str, Any]:
    """Rows per table, sparse tables or not, the K values, rounds and steps per block."""
    if section == "rep":
        return _setup(args.rows, True, args.tasks, args.repeats, args.steps)
    if section == "overhead":
        rows, sparse = OVERHEAD_MODEL["rows"], OVERHEAD_MODEL["sparse"]
        return _setup(rows, sparse, args.tasks, args.repeats, args.overhead_steps)
    if section == "param":
        return _setup(args.param_rows, False, args.tasks, args.param_repeats, args.param_steps)
    return _setup(args.rows, False, args.h2h_tasks, args.param_repeats, args.param_steps)  # h2h


# ---------------------------------------------------------------------------- memory guard
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


def memory_guard(spec: ModeSpec, per_task_bytes: int, k: int, device: str = "cpu") -> str | None:
    """A reason to skip a parameter-level mode whose per-task gradients would not fit in RAM
    (in free GPU memory on CUDA).

    Estimate: 3 dense copies of the K per-task gradients (the gradients, their stacked rows or
    TorchJD's concatenated Jacobian, and the float64/vmap temporaries).
    """
    if spec.level != "parameters" or spec.kind == "plain":
        return None
    if spec.kind in ("ours", "tracker") and not uses_task_gradients(spec.method):
        return None  # MARIGOLD and the loss-level methods: no per-task gradient
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


# ---------------------------------------------------------------------------- timing
def _build_modes(
    specs: list[ModeSpec], group: Group, k: int, device: str
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The step callables of ``specs`` on ``group``, and the reasons of those skipped."""
    per_task = group.per_task_gradient_bytes()
    modes: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for spec in specs:
        reason = memory_guard(spec, per_task, k, device)
        if reason:
            skipped[spec.name] = reason
            continue
        try:
            modes[spec.name] = make_mode(spec, group)
        except Exception as exc:  # noqa: BLE001 - a broken balancer must not stop the run
            skipped[spec.name] = f"{type(exc).__name__}: {exc}"
    return modes, skipped


def _count_syncs(
    modes: dict[str, Callable[[], Any]], timing: TimingResult
) -> dict[str, dict[str, Any] | str | None]:
    """Host syncs inside one untimed backward of every mode that did not fail."""
    syncs: dict[str, dict[str, Any] | str | None] = {}
    for name, fn in modes.items():
        if name in timing.errors:
            continue
        try:
            syncs[name] = count_backward_syncs(fn)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            syncs[name] = f"sync count failed: {type(exc).__name__}: {exc}"[:300]
    return syncs


def _result_row(
    section: str,
    spec: ModeSpec,
    k: int,
    setup: dict[str, Any],
    steps: dict[str, int],
    skipped: dict[str, str],
    timing: TimingResult,
    syncs: dict[str, dict[str, Any] | str | None],
) -> dict[str, Any]:
    """The results-table row of one mode at one K."""
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
    base = timing.times.get("plain", [])
    if row["error"] is None and base:
        row.update(ratio_summary(timing.times[spec.name], base))
    if spec.name in syncs:
        sc = syncs[spec.name]
        if isinstance(sc, dict):
            row["syncs_per_backward"] = sc["total"]
            row["syncs_by_name"] = sc["by_name"]
        elif isinstance(sc, str):
            row["syncs_error"] = sc
    return row


def _time_one_k(
    section: str,
    k: int,
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    setup: dict[str, Any],
    specs: list[ModeSpec],
    embedding: FeatureEmbedding,
    progress: Progress,
) -> list[dict[str, Any]]:
    """One group at ``k``: build its modes, time them interleaved, the rows of its results."""
    group = build_group(section, cfg, k, setup["rows"], setup["sparse"], embedding=embedding)
    modes, skipped = _build_modes(specs, group, k, cfg.device)
    steps = {s.name: (s.steps or setup["steps"]) for s in specs if s.name in modes}
    total = (args.warmup + setup["repeats"]) * len(modes)
    bar = progress(total=total, desc=f"{section} K={k}")
    timing = interleaved_timings(
        modes,
        repeats=setup["repeats"],
        warmup=args.warmup,
        steps=steps,
        clock=device_clock(cfg.device),
        on_block=lambda _n, _r: bar.update(1),
    )
    bar.close()
    syncs = _count_syncs(modes, timing) if section == "overhead" else {}
    return [_result_row(section, s, k, setup, steps, skipped, timing, syncs) for s in specs]


def run_section(
    section: str,
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    peers: dict[str, Any],
    progress: Progress,
) -> dict[str, Any]:
    """Interleaved timing of every mode of ``section`` for each K; rows of the results table.

    ``cfg`` is the section's model (section ``overhead`` passes its small one). Section
    ``overhead`` also counts, after the timed rounds, the host syncs inside one untimed
    backward of every mode (``syncs_per_backward``).
    """
    setup = section_setup(section, args)
    specs = section_modes(section, args, peers)
    embedding = make_embedding(cfg, setup["rows"], setup["sparse"], args.seed)
    rows: list[dict[str, Any]] = []
    for k in setup["tasks"]:
        rows += _time_one_k(section, k, args, cfg, setup, specs, embedding, progress)
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
