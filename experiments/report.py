"""Aggregation over seeds and markdown tables for compare and sweep results."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mtl.metrics import delta_m

__all__ = [
    "DISPLAY_NAMES",
    "compare_table",
    "delta_m_for",
    "display_name",
    "fmt_mean_std",
    "mean_std",
    "short_metrics",
    "summarize",
    "sweep_table",
    "table_columns",
]

DISPLAY_NAMES = {
    "equal": "EqualWeight",
    "mgda": "MGDA",
    "multibalance": "MultiBalance",
    "gradops": "GradOPS",
    "pcgrad": "PCGrad",
    "marigold": "MARIGOLD",
    "uw": "UW",
    "dwa": "DWA",
    "rlw": "RLW",
    "gls": "GLS",
    "famo": "FAMO",
    "gradnorm": "GradNorm",
    "imtlg": "IMTL-G",
    "cagrad": "CAGrad",
    "nashmtl": "Nash-MTL",
    "alignedmtl": "Aligned-MTL",
    "upgrad": "UPGrad",
    "multibalance_s": "MultiBalance [S]",
}

COEFFICIENT_BALANCERS = frozenset({"gradops", "pcgrad"})
"""Balancers whose ``weights_kind`` is ``"coefficients"`` (for results written before the field)."""

HIGHER_IS_BETTER = {
    "auc": True, "gauc": True, "log_loss": False, "ne": False, "mse": False, "loss": False,
}  # fmt: skip
METRIC_LABELS = {
    "auc": "AUC", "gauc": "GAUC", "ne": "NE", "log_loss": "log loss", "mse": "MSE",
    "loss": "loss", "calibration": "calibration (→1)",
}  # fmt: skip

CENSUS_NOTE = (
    "Census-Income numbers are NOT comparable with the MMoE/PLE papers: only the UCI test file "
    "(99,762 rows) is available, re-split 60/20/20 (stratified on the task labels, one split "
    "per seed), i.e. about 4x less training data than the canonical train/test protocol."
)


def display_name(balancer: str, options: Mapping[str, Any] | None = None, level: str = "") -> str:
    """``"MGDA-UB"`` for MGDA at the representation level, ``"GradOPS (alpha=-2)"`` etc."""
    name = DISPLAY_NAMES.get(balancer, balancer)
    if balancer == "mgda" and level == "representation":
        name = "MGDA-UB"
    if options:
        name += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    return name


def variant_of(run: Mapping[str, Any]) -> str:
    """The table row of a run: its ``variant`` label (tuned static weights, ...) when it has
    one, else its balancer name."""
    return str(run.get("variant") or run["balancer"])


def _row_namer(results: Mapping[str, Any], level: str) -> Callable[[str], str]:
    """The table label of a row key: a variant's own label (tuned static weights, ...), else
    the balancer's display name with its options."""
    runs = results.get("runs", [])
    options = {variant_of(r): r.get("options") for r in runs}
    variants = {r.get("variant") for r in runs}

    def name(key: str) -> str:
        return key if key in variants else display_name(key, options.get(key), level)

    return name


def weights_kind(runs: Sequence[Mapping[str, Any]]) -> str:
    """``"coefficients"`` when the runs' balancer reports projection coefficients (GradOPS,
    PCGrad: any sign, any size) rather than task weights; older results carry no field and
    are looked up by balancer name."""
    for r in runs:
        kind = r.get("weights_kind")
        if kind:
            return str(kind)
    names = {r.get("balancer") for r in runs}
    return "coefficients" if names & COEFFICIENT_BALANCERS else "weights"


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return float("nan"), float("nan"), 0
    arr = np.asarray(xs)
    std = float(arr.std(ddof=1)) if len(xs) > 1 else 0.0
    return float(arr.mean()), std, len(xs)


def fmt_mean_std(mean: float, std: float, digits: int = 4, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "n/a"
    s = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{s} ± {std:.{digits}f}"


def short_metrics(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    """One-line summary: ``task0 mse=0.0612  task1 mse=0.0587`` (AUC for binary tasks)."""
    if not metrics:
        return "-"
    parts = []
    for task, m in metrics.items():
        key = "auc" if "auc" in m else "mse" if "mse" in m else next(iter(m), None)
        if key is not None:
            parts.append(f"{task} {key}={m[key]:.4f}")
    return "  ".join(parts)


def _kind(task: Any) -> str:
    return task["kind"] if isinstance(task, Mapping) else task.kind


def _name(task: Any) -> str:
    return task["name"] if isinstance(task, Mapping) else task.name


def delta_m_for(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Any],
    which: Mapping[str, Sequence[str]] | None = None,
) -> float | None:
    """Δm (%) of one run vs the single-task baselines of the same seed.

    ``Δm = (100 / T) Σ_t ±(M_t − B_t) / |B_t|`` over the per-task metrics ``which[kind]``
    (default AUC for binary tasks, MSE for regression), + when higher is better
    (:func:`mtl.metrics.delta_m`). ``None`` when a value is missing or not finite.
    """
    which = which or {"binary": ["auc"], "regression": ["mse"]}
    m: dict[str, float] = {}
    b: dict[str, float] = {}
    hib: dict[str, bool] = {}
    for t in tasks:
        name = _name(t)
        for metric in which.get(_kind(t), []):
            key = f"{name}/{metric}"
            try:
                m[key] = float(metrics[name][metric])
                b[key] = float(baselines[name][metric])
            except KeyError:
                return None
            hib[key] = HIGHER_IS_BETTER[metric]
    if not m or not all(math.isfinite(v) for v in [*m.values(), *b.values()]):
        return None
    try:
        return float(delta_m(m, b, hib))
    except ValueError:
        return None


def table_columns(
    tasks: Sequence[Any], which: Mapping[str, Sequence[str]] | None = None
) -> list[tuple[str, str]]:
    """``[(task, metric), ...]`` shown in the tables (AUC and NE for binary, MSE for regression)."""
    which = which or {"binary": ["auc", "ne"], "regression": ["mse"]}
    return [(_name(t), metric) for t in tasks for metric in which.get(_kind(t), [])]


def _group(runs: Sequence[Mapping[str, Any]], key: Any) -> dict[Any, list[Mapping[str, Any]]]:
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def _stats(runs: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("metrics")]
    out: dict[str, Any] = {"n": len(ok), "failed": len(runs) - len(ok), "metrics": {}}
    for task, metric in columns:
        vals = [r["metrics"].get(task, {}).get(metric) for r in ok]
        out["metrics"].setdefault(task, {})[metric] = mean_std(vals)
    out["delta_m"] = mean_std([r.get("delta_m") for r in ok])
    out["step_time_s"] = mean_std([r.get("step_time_s") for r in ok])
    out["epochs"] = mean_std([r.get("epochs") for r in ok])
    ws = [r["weights_mean"] for r in ok if r.get("weights_mean")]
    out["weights_mean"] = np.asarray(ws, dtype=float).mean(0).tolist() if ws else None
    out["weights_kind"] = weights_kind(runs)
    return out


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Mean ± std over seeds per balancer (and for the single-task baselines).

    Returns ``{"balancers": {name: stats}, "single_task": stats | None}``; ``stats`` holds
    ``metrics[task][metric] = (mean, std, n)``, ``delta_m``, ``step_time_s``, ``epochs`` as
    ``(mean, std, n)``, ``weights_mean`` and ``step_ratio`` (mean step time / EqualWeight's).
    """
    tasks = results.get("tasks", [])
    columns = table_columns(tasks, results.get("config", {}).get("table_metrics"))
    by_bal = _group(results.get("runs", []), variant_of)
    out: dict[str, Any] = {"balancers": {}, "single_task": None}
    for name, runs in by_bal.items():
        out["balancers"][name] = _stats(runs, columns)
    eq = out["balancers"].get("equal")
    eq_time = eq["step_time_s"][0] if eq else float("nan")
    for st in out["balancers"].values():
        t = st["step_time_s"][0]
        st["step_ratio"] = t / eq_time if math.isfinite(eq_time) and eq_time > 0 else float("nan")
    base = results.get("single_task") or []
    if base:
        merged = []
        for seed, group in _group(base, lambda r: r["seed"]).items():
            m = {}
            for r in group:
                m.update(r["metrics"] or {})
            eps = [r.get("epochs") for r in group if r.get("epochs") is not None]
            merged.append(
                {
                    "seed": seed,
                    "metrics": m,
                    "step_time_s": None,
                    "epochs": sum(eps) / len(eps) if eps else None,
                }
            )
        out["single_task"] = _stats(merged, columns)
    return out


def _header_lines(results: Mapping[str, Any], what: str) -> list[str]:
    cfg = results.get("config", {})
    seeds = results.get("seeds", [])
    train = cfg.get("train", {})
    model = cfg.get("model", {}).get("name", "?")
    data = results.get("data", {})
    task = results.get("task", "?")
    lines = [f"## {task}: {what}", ""]
    if cfg.get("description"):
        lines += [str(cfg["description"]), ""]
    sizes = data.get("sizes")
    size_txt = (
        f" Data {data.get('name', task)}: train/valid/test = "
        f"{sizes['train']}/{sizes['valid']}/{sizes['test']} rows."
        if sizes
        else ""
    )
    opt = dict(cfg.get("optimizer") or {})
    opt_txt = f"{opt.pop('name', 'adam')}" + (f" lr {opt['lr']}" if "lr" in opt else "")
    sched = cfg.get("scheduler")
    if sched:
        sched_name = sched if isinstance(sched, str) else sched.get("name", "?")
        opt_txt += f", {sched_name} schedule"
    lines.append(
        f"Test-set metrics, mean ± std (sample std) over {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}); model {model}; {train.get('level', 'representation')}-"
        f"level balancing; {opt_txt}; batch {train.get('batch_size')}; up to "
        f"{train.get('epochs')} epochs, early stopping on the validation score (patience "
        f"{train.get('early_stopping_patience')}), best validation state restored.{size_txt}"
    )
    reg = dict(cfg.get("regularizer") or {})
    reg_name = str(reg.pop("name", "none")).lower()
    if reg_name not in ("none", ""):
        opts = ", ".join(f"{k}={v}" for k, v in sorted(reg.items()))
        lines += ["", f"Regularizer: {reg_name.upper()}" + (f" ({opts})" if opts else "") + "."]
    note = cfg.get("note")
    if str(task).startswith("census") and CENSUS_NOTE not in str(note or ""):
        note = f"{CENSUS_NOTE} {note or ''}".strip()
    if note:
        lines += ["", f"> **Note.** {note}"]
    return lines


def compare_table(results: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> str:
    """The markdown report of a comparison: header notes and the mean ± std table."""
    summary = summary or summarize(results)
    cfg = results.get("config", {})
    level = cfg.get("train", {}).get("level", "representation")
    tasks = results.get("tasks", [])
    columns = table_columns(tasks, cfg.get("table_metrics"))
    has_dm = summary.get("single_task") is not None
    dm_which = cfg.get("delta_m_metrics") or {"binary": ["auc"], "regression": ["mse"]}
    dm_desc = ", ".join(
        f"{_name(t)} {METRIC_LABELS.get(m, m)}" for t in tasks for m in dm_which.get(_kind(t), [])
    )
    lines = _header_lines(results, "balancer comparison")
    lines.append("")
    if has_dm:
        lines.append(
            f"Δm: mean relative change vs single-task baselines (one model per task, same data, "
            f"seed and training budget) over {dm_desc}, in % (positive = better)."
        )
    else:
        lines.append("Δm: not computed (run with --single-task for single-task baselines).")
    lines.append(
        "Step: median wall time of one `optimizer.backward` + `optimizer.step` (ms); "
        "× EW: ratio to EqualWeight's step (one plain backward of the summed loss)."
    )
    lines.append("")
    head = ["method"]
    for task, metric in columns:
        arrow = "" if metric not in HIGHER_IS_BETTER else "↑" if HIGHER_IS_BETTER[metric] else "↓"
        head.append(f"{task} {METRIC_LABELS.get(metric, metric)} {arrow}")
    head += ["Δm % ↑", "step ms", "× EW", "epochs", "weights (mean; coef. = coefficients)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    st = summary.get("single_task")
    if st is not None:
        row = ["single-task"]
        for task, metric in columns:
            mean, std, _ = st["metrics"][task][metric]
            row.append(fmt_mean_std(mean, std))
        row += ["0 (reference)", "", "", f"{st['epochs'][0]:.1f}", ""]
        lines.append("| " + " | ".join(row) + " |")
    row_name = _row_namer(results, level)
    for name, s in summary["balancers"].items():
        row = [row_name(name)]
        if s["n"] == 0:
            row += ["failed"] * len(columns) + ["", "", "", "", ""]
            lines.append("| " + " | ".join(row) + " |")
            continue
        for task, metric in columns:
            mean, std, _ = s["metrics"][task][metric]
            row.append(fmt_mean_std(mean, std))
        dm = s["delta_m"]
        row.append(fmt_mean_std(dm[0], dm[1], 2, signed=True) if has_dm else "n/a")
        t = s["step_time_s"]
        row.append(f"{1e3 * t[0]:.2f} ± {1e3 * t[1]:.2f}" if math.isfinite(t[0]) else "n/a")
        row.append(f"{s['step_ratio']:.2f}×" if math.isfinite(s["step_ratio"]) else "n/a")
        row.append(f"{s['epochs'][0]:.1f}")
        w = s.get("weights_mean")
        coef = "coef. " if s.get("weights_kind") == "coefficients" else ""
        row.append(coef + "[" + ", ".join(f"{x:.2f}" for x in w) + "]" if w else "")
        if s["failed"]:
            row[0] += f" ({s['failed']} failed)"
        lines.append("| " + " | ".join(row) + " |")
    lines += _paired_lines(results)
    lines += _tuned_lines(results, summary)
    lines += _footer(results)
    return "\n".join(lines) + "\n"


def paired_vs_equal(results: Mapping[str, Any]) -> dict[str, tuple[float, float, int, int]]:
    """Each balancer against EqualWeight trained with the SAME seed (same initialisation, batch
    order and data split): ``d_s = Δm`` of the balancer's run with EqualWeight's run of seed ``s``
    as the baseline (the Δm metrics, in %, positive = the balancer is better).

    Returns ``{balancer: (mean d, std d, seeds, seeds with d > 0)}``. The pairing removes the
    spread that both runs of a seed share, so it resolves smaller differences than comparing the
    two mean ± std columns.
    """
    cfg = results.get("config", {})
    which = cfg.get("delta_m_metrics") or {"binary": ["auc"], "regression": ["mse"]}
    tasks = results.get("tasks", [])
    runs = [r for r in results.get("runs", []) if r.get("metrics")]
    equal = {r["seed"]: r["metrics"] for r in runs if variant_of(r) == "equal"}
    out: dict[str, tuple[float, float, int, int]] = {}
    for name, group in _group(runs, variant_of).items():
        if name == "equal":
            continue
        ds = [
            delta_m_for(r["metrics"], equal[r["seed"]], tasks, which)
            for r in group
            if r["seed"] in equal
        ]
        ds = [d for d in ds if d is not None]
        if len(ds) >= 2:
            mean, std, n = mean_std(ds)
            out[name] = (mean, std, n, sum(d > 0 for d in ds))
    return out


def _paired_lines(results: Mapping[str, Any]) -> list[str]:
    paired = paired_vs_equal(results)
    if not paired:
        return []
    level = results.get("config", {}).get("train", {}).get("level", "representation")
    row_name = _row_namer(results, level)
    lines = [
        "",
        "Paired with EqualWeight (same seed: same initialisation, batch order and split): Δm of "
        "each run with EqualWeight's run of its seed as the baseline, in % (positive = better "
        "than EqualWeight).",
        "",
        "| method | vs EqualWeight, Δm % ↑ | seeds better |",
        "|---|---:|---:|",
    ]
    for name, (mean, std, n, wins) in paired.items():
        lines.append(
            f"| {row_name(name)} | {fmt_mean_std(mean, std, 2, signed=True)} | {wins}/{n} |"
        )
    return lines


TUNED_PREFIX = "static weights (tuned"
"""Row names of the tuned static-weight baseline start with this (:func:`tuned_label`)."""


def tuned_label(num_runs: int) -> str:
    """The row name of the tuned static-weight baseline (:mod:`experiments.tune_static`)."""
    return f"{TUNED_PREFIX}, {num_runs} runs)"


WITHIN = 1.0
"""The tolerance (%, relative) of "as good as the tuned static weights" (issue 18's target)."""


def vs_tuned(
    results: Mapping[str, Any], summary: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, dict[str, float]]] | None:
    """Every row against the tuned static weights: the relative difference of the seed means,
    per (task, Δm metric), in % (positive = better than the tuned weights).

    Returns ``(tuned row name, {row: {"task metric": %}})``, or ``None`` without a tuned row.
    """
    summary = summary or summarize(results)
    rows = summary["balancers"]
    tuned = next((name for name in rows if str(name).startswith(TUNED_PREFIX)), None)
    if tuned is None or rows[tuned]["n"] == 0:
        return None
    which = results.get("config", {}).get("delta_m_metrics") or {
        "binary": ["auc"],
        "regression": ["mse"],
    }
    columns = [(_name(t), m) for t in results.get("tasks", []) for m in which.get(_kind(t), [])]
    ref = rows[tuned]["metrics"]
    out: dict[str, dict[str, float]] = {}
    for name, st in rows.items():
        if name == tuned or st["n"] == 0:
            continue
        gaps: dict[str, float] = {}
        for task, metric in columns:
            try:
                mine, base = st["metrics"][task][metric][0], ref[task][metric][0]
            except KeyError:
                continue
            sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
            gaps[f"{task} {METRIC_LABELS.get(metric, metric)}"] = (
                100.0 * sign * (mine - base) / abs(base) if base else float("nan")
            )
        out[name] = gaps
    return tuned, out


def _tuned_lines(results: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    found = vs_tuned(results, summary)
    if found is None:
        return []
    tuned, gaps = found
    if not gaps:
        return []
    level = results.get("config", {}).get("train", {}).get("level", "representation")
    row_name = _row_namer(results, level)
    cols = list(next(iter(gaps.values())))
    lines = [
        "",
        f"Against the {tuned}: relative difference of the seed means per task, in % "
        f"(positive = better than the tuned weights); 'within {WITHIN:g} %' when no task is "
        f"worse by more than {WITHIN:g} %.",
        "",
        "| method | " + " | ".join(cols) + f" | within {WITHIN:g} % |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, g in gaps.items():
        ok = all(math.isfinite(v) and v >= -WITHIN for v in g.values())
        cells = [f"{g.get(c, float('nan')):+.2f}" for c in cols]
        lines.append(f"| {row_name(name)} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
    return lines


def _footer(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    unavailable = results.get("unavailable") or {}
    if unavailable:
        lines.append("")
        lines.append(
            "Not run (balancer not available): "
            + "; ".join(f"{DISPLAY_NAMES.get(k, k)}: {v}" for k, v in unavailable.items())
        )
    failed = [r for r in results.get("runs", []) if r.get("error")]
    if failed:
        lines.append("")
        lines.append("Failed runs:")
        for r in failed:
            lines.append(f"- {r['balancer']} seed {r['seed']}: {r['error']}")
    env = results.get("environment") or {}
    wall = results.get("wall_time_s")
    if env or wall is not None:
        lines.append("")
        txt = f"torch {env.get('torch', '?')}, {env.get('threads', '?')} thread(s)"
        if wall is not None:
            txt += f"; total wall time {wall:.0f} s"
        lines.append(f"_{txt}._")
    return lines


def sweep_table(results: Mapping[str, Any]) -> str:
    """The markdown report of a parameter sweep: one row per parameter value."""
    cfg = results.get("config", {})
    tasks = results.get("tasks", [])
    columns = table_columns(tasks, cfg.get("table_metrics"))
    param = results.get("param", "?")
    balancer = results.get("balancer", "?")
    lines = _header_lines(results, f"{display_name(balancer)} sweep over {param}")
    base = results.get("single_task") or []
    has_dm = bool(base)
    lines.append("")
    head = [param] + [
        f"{t} {METRIC_LABELS.get(m, m)} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}"
        for t, m in columns
    ]
    if has_dm:
        head.append("Δm % ↑")
    head += ["step ms", "epochs", "weights (mean)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---:"] * len(head)) + "|")
    groups = _group(results.get("runs", []), lambda r: repr(r.get("value")))
    for value in results.get("values", []):
        runs = groups.get(repr(value), [])
        s = _stats(runs, columns)
        row = [str(value)]
        for task, metric in columns:
            mean, std, _ = s["metrics"][task][metric]
            row.append(fmt_mean_std(mean, std))
        if has_dm:
            row.append(fmt_mean_std(s["delta_m"][0], s["delta_m"][1], 2, signed=True))
        t = s["step_time_s"]
        row.append(f"{1e3 * t[0]:.2f}" if math.isfinite(t[0]) else "n/a")
        row.append(f"{s['epochs'][0]:.1f}" if math.isfinite(s["epochs"][0]) else "n/a")
        w = s.get("weights_mean")
        coef = "coef. " if s.get("weights_kind") == "coefficients" else ""
        row.append(coef + "[" + ", ".join(f"{x:.2f}" for x in w) + "]" if w else "")
        if s["failed"]:
            row[0] += f" ({s['failed']} failed)"
        lines.append("| " + " | ".join(row) + " |")
    lines += _footer(results)
    return "\n".join(lines) + "\n"


def sweep_series(
    results: Mapping[str, Any],
) -> tuple[list[Any], list[tuple[str, str]], dict[tuple[str, str], list[tuple[float, float]]]]:
    """``(values, columns, {(task, metric): [(mean, std) per value]})`` of a sweep."""
    cfg = results.get("config", {})
    columns = table_columns(results.get("tasks", []), cfg.get("table_metrics"))
    groups = _group(results.get("runs", []), lambda r: repr(r.get("value")))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {c: [] for c in columns}
    for value in results.get("values", []):
        s = _stats(groups.get(repr(value), []), columns)
        for task, metric in columns:
            mean, std, _ = s["metrics"][task][metric]
            series[(task, metric)].append((mean, std))
    return list(results.get("values", [])), columns, series
