"""The 2-D two-objective toy (CAGrad / Nash-MTL / FAMO): trajectories of every balancer.

Each balancer runs from the five standard starts (:data:`tasks.toy.TOY_STARTS`) with Adam
(lr 1e-3) at the parameter level for ``steps`` steps (default a few thousand so a run is quick;
the papers use 35k-50k: ``--steps 35000``). Recorded per run: the trajectory, the final losses
(scaled as optimised), the Euclidean distance of the end point to the Pareto set
(:func:`tasks.toy.pareto_front`, 2001 points) and the step time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from balancers.registry import make_balancer

from . import report
from .runner import (
    Log,
    _failed,
    _quiet,
    _takes_seed,
    accepts_closure,
    environment,
    run_jobs,
)

__all__ = ["TOY_DEFAULTS", "run_toy", "toy_options", "toy_run", "toy_table", "toy_sweep_table"]

TOY_DEFAULTS: dict[str, Any] = {
    "steps": 3000,
    "lr": 1e-3,
    "scales": [0.1, 1.0],
    "starts": None,  # None: tasks.toy.TOY_STARTS
    "level": "parameters",
    "record_every": 10,
    "reach_tol": 0.05,
}
TASK_NAMES = ("L1", "L2")

_PARETO_CACHE: dict[int, np.ndarray] = {}


def toy_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``toy`` section of the configuration with defaults filled in."""
    from tasks.toy import TOY_STARTS

    opts = {**TOY_DEFAULTS, **dict(cfg.get("toy") or {})}
    if opts["starts"] is None:
        opts["starts"] = [list(s) for s in TOY_STARTS]
    if opts["scales"] is not None:
        opts["scales"] = [float(s) for s in opts["scales"]]
    if opts["level"] not in ("parameters", "representation"):
        raise ValueError(
            f"toy.level must be 'parameters' or 'representation', got {opts['level']!r}"
        )
    return opts


def _pareto(n: int = 2001) -> np.ndarray:
    from tasks.toy import pareto_front

    if n not in _PARETO_CACHE:
        _PARETO_CACHE[n] = pareto_front(n)
    return _PARETO_CACHE[n]


def distance_to_pareto(x: Sequence[float]) -> float:
    """Euclidean distance from ``x`` to the (densely sampled) Pareto set."""
    pts = _pareto()
    return float(np.sqrt(((pts - np.asarray(x, dtype=float)) ** 2).sum(1)).min())


def toy_run(
    balancer: str,
    options: Mapping[str, Any],
    start: Sequence[float],
    *,
    steps: int,
    lr: float,
    scales: Sequence[float] | None,
    level: str = "parameters",
    seed: int = 0,
    record_every: int = 10,
    bar: Any = None,
) -> dict[str, Any]:
    """One trajectory: ``steps`` Adam steps of ``balancer`` from ``start``."""
    from tasks.toy import ToyModel, toy_losses

    torch.manual_seed(int(seed))
    model = ToyModel(start=start, scales=scales)
    inner = torch.optim.Adam(model.parameters(), lr=lr)
    extra = {"seed": int(seed)} if "seed" not in options and _takes_seed(balancer) else {}
    opt = make_balancer(balancer, inner, 2, task_names=list(TASK_NAMES), **dict(options), **extra)
    closure_on = accepts_closure(opt)
    # FAMO re-runs the model (no argument) at both levels; MARIGOLD maps a shifted representation
    whole_model = level == "parameters" or bool(type(opt).closure_reruns_model)
    sc = model.scales

    def param_closure() -> list[torch.Tensor]:
        return list(model().task_outputs)

    def rep_closure(z: torch.Tensor) -> list[torch.Tensor]:
        return list(toy_losses(z, sc)[0].unbind())

    traj = [[float(start[0]), float(start[1])]]
    times: list[float] = []
    wsum = np.zeros(2)
    n_w = 0
    for t in range(int(steps)):
        out = model()
        opt.zero_grad()
        kwargs: dict[str, Any] = (
            {"shared_parameters": model.shared_parameters()}
            if level == "parameters"
            else {"representation": out.representation}
        )
        if closure_on:
            kwargs["closure"] = param_closure if whole_model else rep_closure
        t0 = time.perf_counter()
        info = opt.backward(out.task_outputs, **kwargs)
        opt.step()
        times.append(time.perf_counter() - t0)
        if not info.skipped:
            w = info.weights.detach().to(torch.float64)
            wsum += (w.mean(0) if w.dim() == 2 else w).numpy()
            n_w += 1
        if (t + 1) % record_every == 0 or t + 1 == steps:
            traj.append(model.x.detach().tolist())
        if bar is not None:
            bar.update(1)
    x = model.x.detach().tolist()
    final = model.losses().detach().tolist()
    warm = times[5:] if len(times) > 20 else times
    return {
        "balancer": balancer,
        "options": dict(options),
        "seed": int(seed),
        "start": [float(s) for s in start],
        "final_x": x,
        "metrics": {TASK_NAMES[k]: {"loss": float(final[k])} for k in range(2)},
        "distance_to_pareto": distance_to_pareto(x),
        "step_time_s": float(np.median(warm)) if warm else float("nan"),
        "epochs": None,
        "steps": int(steps),
        "weights_mean": (wsum / max(n_w, 1)).tolist(),
        "trajectory": traj,
    }


def _bar(total: int, desc: str, progress: bool | None) -> Any:
    import sys

    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    if not enabled:
        return None
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step")


def _toy_job(
    opts: Mapping[str, Any],
    variant: Mapping[str, Any],
    seed: int,
    *,
    progress: bool | None,
    log: Log,
) -> list[dict[str, Any]]:
    """One balancer variant (``{"balancer", "options"[, "value", "param"]}``) from every start."""
    name, options = variant["balancer"], dict(variant["options"])
    label = name if "value" not in variant else f"{name} {variant['param']}={variant['value']}"
    bar = _bar(opts["steps"] * len(opts["starts"]), f"{label} seed {seed}", progress)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        for i, start in enumerate(opts["starts"]):
            rec = toy_run(
                name, options, start, steps=opts["steps"], lr=opts["lr"],
                scales=opts["scales"], level=opts["level"], seed=seed,
                record_every=opts["record_every"], bar=bar,
            )  # fmt: skip
            rec["start_index"] = i
            runs.append(rec)
    except Exception as e:
        runs = [_failed(name, options, seed, e)]
        log(f"  {label:>26s} seed {seed}: FAILED: {runs[0]['error']}")
    else:
        d = np.mean([r["distance_to_pareto"] for r in runs])
        log(
            f"  {label:>26s} seed {seed}: mean distance to the Pareto set {d:.3f}, "
            f"step {1e3 * np.median([r['step_time_s'] for r in runs]):.3f} ms "
            f"({time.perf_counter() - t0:.1f}s)"
        )
    finally:
        if bar is not None:
            bar.close()
    if "value" in variant:
        for r in runs:
            r["value"] = variant["value"]
    return runs


def run_toy(
    cfg: dict[str, Any],
    balancers: Sequence[str],
    seeds: Sequence[int],
    *,
    unavailable: Mapping[str, str] | None = None,
    progress: bool | None = None,
    log: Log = _quiet,
    param: str | None = None,
    values: Sequence[Any] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every balancer (or one balancer × every ``values`` of ``param``) from every start;
    ``jobs > 1`` runs the (seed, balancer) combinations in parallel processes."""
    from tasks.toy import pareto_front_losses

    t_start = time.perf_counter()
    opts = toy_options(cfg)
    cfg = {**cfg, "toy": opts, "table_metrics": {"toy": ["loss"]}}
    variants: list[dict[str, Any]] = []
    for name in balancers:
        base = dict((cfg.get("balancers") or {}).get(name) or {})
        if param is None:
            variants.append({"balancer": name, "options": base})
        else:
            for v in values or []:
                variants.append(
                    {"balancer": name, "options": {**base, param: v}, "value": v, "param": param}
                )
    parts = run_jobs(
        _toy_job,
        [(opts, var, seed) for seed in seeds for var in variants],
        jobs=jobs,
        progress=progress,
        log=log,
    )
    scales = opts["scales"]
    out: dict[str, Any] = {
        "task": "toy",
        "tasks": [{"name": n, "kind": "toy"} for n in TASK_NAMES],
        "config": cfg,
        "balancers": list(balancers),
        "seeds": list(seeds),
        "runs": [r for part in parts for r in part],
        "single_task": [],
        "unavailable": dict(unavailable or {}),
        "environment": environment(),
        "true_front": pareto_front_losses(200, scales).tolist(),
        "jobs": jobs,
        "wall_time_s": time.perf_counter() - t_start,
    }
    if param is not None:
        out["balancer"] = balancers[0] if balancers else None
        out["param"] = param
        out["values"] = list(values or [])
    return out


def _toy_header(results: Mapping[str, Any], what: str) -> list[str]:
    opts = results["config"]["toy"]
    seeds = results.get("seeds", [])
    return [
        f"## toy: {what}",
        "",
        f"2-D two-objective toy (CAGrad / Nash-MTL / FAMO), losses scaled by {opts['scales']}; "
        f"{len(opts['starts'])} starts {', '.join(str(tuple(s)) for s in opts['starts'])}; "
        f"Adam lr {opts['lr']}, {opts['steps']} steps ({opts['level']} level); "
        f"seeds {', '.join(map(str, seeds))}. The papers run 35k-50k steps: with fewer, "
        "trajectories from far starts have not reached the Pareto set yet.",
        "",
        f"Final losses (as optimised) and Euclidean distance of the end point to the Pareto set "
        f"(x1 in [-7, 7], x2 ~ -8.36 to -8.43); 'reached' = distance < {opts['reach_tol']}; "
        "mean ± std over starts and seeds.",
        "",
    ]


def toy_table(results: Mapping[str, Any]) -> str:
    """Markdown: a summary row per balancer and a per-start table of end points."""
    opts = results["config"]["toy"]
    level = opts["level"]
    runs = [r for r in results.get("runs", []) if r.get("metrics")]
    bals = list(dict.fromkeys(r["balancer"] for r in results.get("runs", [])))
    lines = _toy_header(results, "balancer comparison")
    lines.append(
        "| method | L1 final | L2 final | distance to Pareto set | reached | step ms | weights (mean) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for b in bals:
        mine = [r for r in runs if r["balancer"] == b]
        if not mine:
            lines.append(f"| {report.display_name(b, None, level)} | failed | | | | | |")
            continue
        l1 = report.mean_std([r["metrics"]["L1"]["loss"] for r in mine])
        l2 = report.mean_std([r["metrics"]["L2"]["loss"] for r in mine])
        d = report.mean_std([r["distance_to_pareto"] for r in mine])
        reached = sum(r["distance_to_pareto"] < opts["reach_tol"] for r in mine)
        st = np.median([r["step_time_s"] for r in mine])
        w = np.mean([r["weights_mean"] for r in mine], axis=0)
        lines.append(
            f"| {report.display_name(b, None, level)} | {report.fmt_mean_std(l1[0], l1[1], 3)} | "
            f"{report.fmt_mean_std(l2[0], l2[1], 3)} | {report.fmt_mean_std(d[0], d[1], 3)} | "
            f"{reached}/{len(mine)} | {1e3 * st:.3f} | [{w[0]:.2f}, {w[1]:.2f}] |"
        )
    lines += [
        "",
        "End points per start (first seed): x = (x1, x2), distance to the Pareto set.",
        "",
    ]
    starts = opts["starts"]
    lines.append("| method | " + " | ".join(f"start {tuple(s)}" for s in starts) + " |")
    lines.append("|---|" + "|".join(["---:"] * len(starts)) + "|")
    seed0 = results.get("seeds", [0])[0] if results.get("seeds") else 0
    for b in bals:
        cells = []
        for i in range(len(starts)):
            r = next(
                (
                    r
                    for r in runs
                    if r["balancer"] == b and r["seed"] == seed0 and r.get("start_index") == i
                ),
                None,
            )
            cells.append(
                "-" if r is None else
                f"({r['final_x'][0]:.2f}, {r['final_x'][1]:.2f}) d={r['distance_to_pareto']:.2f}"
            )  # fmt: skip
        lines.append(f"| {report.display_name(b, None, level)} | " + " | ".join(cells) + " |")
    lines += report._footer(results)
    return "\n".join(lines) + "\n"


def toy_sweep_table(results: Mapping[str, Any]) -> str:
    """Markdown: one row per value of the swept parameter."""
    opts = results["config"]["toy"]
    param = results.get("param", "?")
    lines = _toy_header(
        results, f"{report.display_name(results.get('balancer', '?'))} sweep over {param}"
    )
    lines.append(
        f"| {param} | L1 final | L2 final | distance to Pareto set | reached | weights (mean) |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for v in results.get("values", []):
        mine = [r for r in results.get("runs", []) if r.get("metrics") and r.get("value") == v]
        if not mine:
            lines.append(f"| {v} | failed | | | | |")
            continue
        l1 = report.mean_std([r["metrics"]["L1"]["loss"] for r in mine])
        l2 = report.mean_std([r["metrics"]["L2"]["loss"] for r in mine])
        d = report.mean_std([r["distance_to_pareto"] for r in mine])
        reached = sum(r["distance_to_pareto"] < opts["reach_tol"] for r in mine)
        w = np.mean([r["weights_mean"] for r in mine], axis=0)
        lines.append(
            f"| {v} | {report.fmt_mean_std(l1[0], l1[1], 3)} | {report.fmt_mean_std(l2[0], l2[1], 3)} | "
            f"{report.fmt_mean_std(d[0], d[1], 3)} | {reached}/{len(mine)} | [{w[0]:.2f}, {w[1]:.2f}] |"
        )
    lines += report._footer(results)
    return "\n".join(lines) + "\n"
