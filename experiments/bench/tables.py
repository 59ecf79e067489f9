"""The results as markdown (``results.md``): the header, one table per section, the derived
tables, the two studies and the budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from experiments.bench.results import mem_view, num, ratio_cell

__all__ = ["render_markdown"]

#: the modes whose ms/step the head-to-head table shows, in its column order
_H2H_MODES = ("plain", "param:mgda", "rep:mgda", "torchjd:mgda:emb", "torchjd:mgda:noemb")

_CUDA_NOTE = (
    "Ratio = median over rounds of (mode's time per step / plain step's time in the same "
    "round) [min–max]; ms/step = median; every timed block is bracketed by "
    "`torch.cuda.synchronize()`. Peak CUDA MB (memory K only): "
    "`torch.cuda.max_memory_allocated` over the mode's measured steps (fresh model and "
    "optimizer around the section's tables, one warm-up step, then "
    "`reset_peak_memory_stats`), ratio to plain's; step Δ = that peak minus the memory "
    "allocated before the steps (ratio to plain's Δ)."
)
_CPU_NOTE = (
    "Ratio = median over rounds of (mode's time per step / plain step's time in the same "
    "round) [min–max]; ms/step = median. Peak RSS (memory K only): `VmHWM` of a fresh "
    "child process that builds the model and runs the mode, ratio to the plain child; "
    "step Δ = peak RSS during the steps minus RSS before them (ratio to plain's Δ)."
)


def _header(results: dict[str, Any], cuda: bool) -> list[str]:
    """Command, machine, load, wall time, device, model, missing peers, how to read a ratio."""
    meta = results["meta"]
    lines = ["# Benchmark results", ""]
    lines.append(f"Command: `{meta['command']}`  ")
    lines.append(f"Machine: {meta['machine']['summary']}  ")
    la = meta["machine"]
    lines.append(f"Load average before: {la['loadavg_before']}, after: {la['loadavg_after']}  ")
    lines.append(f"Wall time: {meta['elapsed_s']:.0f} s  ")
    device = meta.get("device", "cpu")
    lines.append(f"Device: {meta['machine'].get('device_summary', device)}  ")
    c = meta["model"]
    lines.append(
        f"Model: SharedBottom, {c['fields']} fields x table(rows) x {c['dim']}, {c['numeric']} "
        f"numeric, bottom {'-'.join(map(str, c['bottom']))}, tower {'-'.join(map(str, c['tower']))}, "
        f"batch {c['batch_size']}; Adam (dense) + {c['table_optimizer']} (tables)"
    )
    lines.append("")
    if meta.get("balancers"):
        lines.append(f"Balancers: {', '.join(meta['balancers'])}")
        lines.append("")
    for name, why in (meta.get("unavailable_balancers") or {}).items():
        lines.append(f"> note: balancer {name} not available, not run ({why})")
    for key, p in results["peers"].items():
        if not p["available"]:
            lines.append(f"> note: {key} not available ({p['reason']})")
    lines.append("")
    lines.append(_CUDA_NOTE if cuda else _CPU_NOTE)
    lines.append("")
    return lines


def _row(*cells: object) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(
    title: str, columns: Sequence[str], rows: Iterable[str], intro: str | None = None
) -> list[str]:
    """A titled markdown table (``intro``: a paragraph between the title and the table),
    followed by a blank line."""
    head = [title, ""] if intro is None else [title, "", intro, ""]
    return [*head, _row(*columns), "|" + "---|" * len(columns), *rows, ""]


def _section_row(r: dict[str, Any], mem_k: Any) -> str:
    mv = mem_view(r)
    note = r.get("error") or mv["error"] or ""
    mem = r["K"] == mem_k
    delta = ""
    if mem and mv["step_mb"] is not None:
        delta = f"{mv['step_mb']:.0f}"
        if mv["step_ratio"] is not None:
            delta += f" ({mv['step_ratio']:.2f}x)"
    elif mem:
        delta = "–"
    return _row(
        r["mode"],
        r["level"],
        r["K"],
        ratio_cell(r),
        num(r.get("ms_per_step")),
        num(mv["mb"], "{:.0f}") if mem else "",
        num(mv["ratio"], "{:.3f}") if mem else "",
        delta,
        note[:120],
    )


def _section_table(section: str, data: dict[str, Any], cuda: bool) -> list[str]:
    """A timing section: ratio, ms/step, and peak memory at the memory K, per mode and K."""
    mem_k = data.get("memory", {}).get("K")
    peak, mem_ratio = ("peak CUDA MB", "CUDA mem ratio") if cuda else ("peak RSS MB", "RSS ratio")
    return _table(
        f"## Section `{section}`: {data['title']} ({data['rows_per_table']} rows per "
        f"table; {data['repeats']} rounds x {data['steps_per_block']} steps)",
        ("mode", "level", "K", "ratio [min–max]", "ms/step", peak, mem_ratio)
        + ("step Δ MB (ratio)", "note"),
        [_section_row(r, mem_k) for r in data["results"]],
    )


def _overhead_row(r: dict[str, Any]) -> str:
    note = r.get("error") or r.get("syncs_error") or ""
    by_name = r.get("syncs_by_name")
    if by_name:
        note = (note + " " if note else "") + ", ".join(f"{k} {v}" for k, v in by_name.items())
    return _row(
        r["mode"],
        r["level"],
        r["K"],
        ratio_cell(r),
        num(r.get("ms_per_step"), "{:.3f}"),
        num(r.get("syncs_per_backward"), "{:d}"),
        note[:120],
    )


def _overhead_markdown(data: dict[str, Any]) -> list[str]:
    """Section ``overhead``: its model, then ratio, ms/step and syncs per backward per mode."""
    c = data.get("model") or {}
    return _table(
        f"## Section `overhead`: {data['title']} ({data['repeats']} rounds x "
        f"{data['steps_per_block']} steps)",
        ("mode", "level", "K", "ratio [min–max]", "ms/step", "syncs/backward", "note"),
        [_overhead_row(r) for r in data["results"]],
        intro=f"Model: {c.get('fields')} dense tables of {data['rows_per_table']} x "
        f"{c.get('dim')}, {c.get('numeric')} numeric, bottom "
        f"{'-'.join(map(str, c.get('bottom', ())))}, towers "
        f"{'-'.join(map(str, c.get('tower', ())))}, batch {c.get('batch_size')}; device "
        f"{data.get('device', 'cpu')}. syncs/backward: calls of item, tolist, `__bool__`, "
        "`__float__`, `__int__`, cpu, numpy, nonzero inside one untimed `backward` after the "
        "timed rounds (`experiments/bench/syncs.py`).",
    )


# ---------------------------------------------------------------------------- derived tables
def _ratio_range(r: dict[str, Any], key: str, fmt: str, unit: str = "") -> str:
    """``r[key]`` (with ``unit``) and its ``[min–max]`` (``r[key + "_min"]``, ``..._max``)."""
    lo, hi = r[key + "_min"], r[key + "_max"]
    return f"{r[key]:{fmt}}{unit} [{lo:{fmt}}–{hi:{fmt}}]"


def _multibalance_table(rows: list[dict[str, Any]]) -> list[str]:
    def cell(r: dict[str, Any], key: str) -> str:
        ratio, change = r[f"{key}_ratio"], r[f"{key}_qps_change"]
        return "–" if ratio is None else f"{ratio:.2f}x ({100 * change:+.0f} %)"

    return _table(
        "## Claim: MultiBalance (representation level ≈ neutral throughput, parameter level "
        "loses 70–80 %)",
        (
            "K",
            "rep. level, dense tables: ratio (QPS change)",
            "param. level, dense tables: ratio (QPS change)",
            "rep. level, sparse tables: ratio (QPS change)",
        ),
        [_row(r["K"], cell(r, "rep"), cell(r, "param"), cell(r, "rep_sparse")) for r in rows],
    )


def _mgda_ub_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(
        "## Claim: MGDA-UB (time saved vs parameter-level MGDA as K grows; dense tables)",
        ("K", "MGDA-UB ms", "MGDA (param.) ms", "time ratio [min–max]", "time saved", "speed-up"),
        [
            _row(
                r["K"],
                f"{r['rep_ms']:.1f}",
                f"{r['param_ms']:.1f}",
                _ratio_range(r, "time_ratio", ".3f"),
                f"{100 * r['time_saved']:.0f} %",
                f"{r['speedup']:.1f}x",
            )
            for r in rows
        ],
    )


def _marigold_k_table(rows: list[dict[str, Any]]) -> list[str]:
    def rc(r: dict[str, Any], key: str) -> str:
        return _ratio_range(r, f"{key}_ratio", ".3f") if f"{key}_ratio" in r else "–"

    return _table(
        "## MARIGOLD K-scaling (parameter level, fd estimator, one extra forward)",
        (
            "K",
            "plain (dense) ms",
            "MARIGOLD (dense) ratio",
            "MGDA param. (dense) ratio",
            "plain (sparse) ms",
            "MARIGOLD param. (sparse) ratio",
            "MARIGOLD rep. (sparse) ratio",
        ),
        [
            _row(
                r["K"],
                num(r.get("plain_dense_ms")),
                rc(r, "marigold_dense"),
                rc(r, "mgda_dense"),
                num(r.get("plain_sparse_ms")),
                rc(r, "marigold_sparse"),
                rc(r, "marigold_rep_sparse"),
            )
            for r in rows
        ],
    )


def _diagnostics_table(rows: list[dict[str, Any]]) -> list[str]:
    def pct(v: float) -> str:
        return f"{100 * v:+.1f}"

    return _table(
        "## Diagnostics overhead: ConflictTracker(every=10) fed from BalanceInfo (MGDA-UB)",
        ("K", "MGDA-UB ms", "+ tracker ms", "overhead median [min–max]"),
        [
            _row(
                r["K"],
                f"{r['mgda_ms']:.1f}",
                f"{r['tracker_ms']:.1f}",
                f"{pct(r['overhead'])} % [{pct(r['overhead_min'])}, {pct(r['overhead_max'])}]",
            )
            for r in rows
        ],
    )


def _h2h_table(entries: list[dict[str, Any]]) -> list[str]:
    def sp(e: dict[str, Any], label: str) -> str:
        k = f"speedup_vs_{label}"
        return _ratio_range(e, k, ".2f", "x") if k in e else "–"

    return _table(
        "## Head-to-head: TorchJD mtl_backward + MGDA vs ours",
        ("K", "plain ms", "ours param. ms", "MGDA-UB ms", "TorchJD (tables in) ms")
        + ("TorchJD (tables out) ms", "speed-up param. [min–max]", "speed-up MGDA-UB [min–max]"),
        [
            _row(
                e["K"],
                *(num(e.get(f"{mode}_ms")) for mode in _H2H_MODES),
                sp(e, "param"),
                sp(e, "rep"),
            )
            for e in entries
        ],
    )


# ---------------------------------------------------------------------------- studies, budget
def _lambda_rows(run: dict[str, Any]) -> list[str]:
    if run.get("error") and not run.get("records"):
        return [f"| {run['K']} | error: {run['error'][:100]} | | |"]
    rows = [
        _row(run["K"], rec["step"], f"{rec['l1']:.3f}", f"{rec['l1_uniform']:.3f}")
        for rec in run["records"]
    ]
    sm = run.get("summary")
    if sm:
        rows.append(
            _row(
                run["K"],
                f"mean over steps ≥ {sm['from_step']}",
                f"**{sm['mean_l1']:.3f}**",
                f"**{sm['mean_l1_uniform']:.3f}**",
            )
        )
    return rows


def _lambda_table(runs: list[dict[str, Any]]) -> list[str]:
    return _table(
        "## MARIGOLD λ vs exact MGDA weights along training (parameter level, sparse tables)",
        ("K", "step", "L1(λ, MGDA)", "L1(uniform, MGDA)"),
        [row for run in runs for row in _lambda_rows(run)],
    )


def _agreement_table(ag: dict[str, Any]) -> list[str]:
    title = "## MGDA weights: ours (parameter level, exact solver) vs TorchJD MGDA, same batch"
    if not ag.get("available"):
        return [title, "", f"not measured: {ag.get('reason')}", ""]
    rows = []
    for label in ("torchjd_default", "torchjd_tight"):
        e = ag[label]
        rows.append(
            _row(
                f"{label} {e['options'] or '(epsilon=1e-3, max_iters=100)'}",
                [round(v, 4) for v in e["weights"]],
                f"{e['max_abs_diff']:.2e}",
                num(e["objective"], "{:.6g}"),
            )
        )
    return _table(
        title,
        ("TorchJD MGDA", "weights", "max abs diff", "objective wᵀMw"),
        rows,
        intro=f"K={ag['K']}, {ag['rows']}-row tables. Ours: "
        f"{[round(v, 4) for v in ag['ours']]}, objective wᵀMw = "
        f"{ag.get('objective_ours', math.nan):.6g}",
    )


def _budget_markdown(budget: list[dict[str, Any]]) -> list[str]:
    def met(b: dict[str, Any]) -> str:
        return "–" if b["met"] is None else ("yes" if b["met"] else "**no**")

    return _table(
        "## Performance budget (DESIGN.md)",
        ("item", "budget", "measured", "met"),
        [_row(b["item"], b["budget"], b["measured"], met(b)) for b in budget],
    )


def render_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    cuda = torch.device(results["meta"].get("device", "cpu")).type == "cuda"
    lines = _header(results, cuda)
    for section, data in results["sections"].items():
        if section == "overhead":
            lines += _overhead_markdown(data)
        else:
            lines += _section_table(section, data, cuda)
    d = results["derived"]
    if d["multibalance"]:
        lines += _multibalance_table(d["multibalance"])
    if d["mgda_ub"]:
        lines += _mgda_ub_table(d["mgda_ub"])
    if d["marigold_k"]:
        lines += _marigold_k_table(d["marigold_k"])
    lam = results.get("marigold_lambda", {})
    if lam.get("runs"):
        lines += _lambda_table(lam["runs"])
    if d["diagnostics"]:
        lines += _diagnostics_table(d["diagnostics"])
    lines += _agreement_table(results.get("mgda_agreement", {}))
    if d.get("h2h"):
        lines += _h2h_table(d["h2h"])
    lines += _budget_markdown(results["budget"])
    return "\n".join(lines)
