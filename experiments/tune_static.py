"""The tuned static-weight baseline: grid-search fixed task weights on the validation set.

What users do today instead of a balancer: train ``sum_k w_k L_k`` for many weight vectors
and keep the best. This module does exactly that, with the toolkit's own training loop, so a
balancer's single run can be compared with the weights a grid search finds:

1. the grid: ``w_anchor = 1`` and every other ``w_k`` in a log-spaced list (default
   :data:`DEFAULT_GRID`, ``10^-4 .. 10``); ``G^(K-1)`` weight vectors for ``G`` values. With an
   adaptive inner optimizer (Adam) the overall scale of the loss barely matters, so fixing one
   weight loses nothing;
2. one training run per weight vector and tuning seed (EqualWeight with ``weights=w``), plus
   the single-task baselines of each tuning seed;
3. the score of a vector: its **validation** Δm against the single-task baselines' validation
   metrics (the config's ``delta_m_metrics``), averaged over the tuning seeds; the best score
   wins (ties: the first in grid order). The test split is never looked at.

``python -m experiments tune-static --task census --group mixed --out runs/tune`` writes
``tuned.json`` (the weights, the number of training runs it took, the selection rule);
``python -m experiments compare ... --tuned-static runs/tune`` then trains the tuned weights on
the comparison's seeds and lists them as "static weights (tuned, N runs)" next to each
balancer's single run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import report, runner
from .report import tuned_label

__all__ = [
    "DEFAULT_GRID",
    "TunedStatic",
    "load_tuned",
    "run_tune_static",
    "static_weight_grid",
    "tune_table",
    "tuned_label",
]

DEFAULT_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Log-spaced values of each non-anchor weight."""

TUNED_FILE = "tuned.json"

# the config entries that must agree between the tuning and the comparison
_MATCHED_KEYS = ("task", "data", "model", "optimizer", "scheduler", "train", "regularizer")


class TunedStatic(dict[str, Any]):
    """The content of ``tuned.json``: ``weights``, ``num_runs``, ``valid_delta_m``, ``grid``,
    ``tune_seeds``, ``task``, ``config``, ``selection``."""


def static_weight_grid(
    num_tasks: int, grid: Sequence[float] = DEFAULT_GRID, anchor: int = 0
) -> list[list[float]]:
    """Every weight vector with ``w[anchor] = 1`` and the other entries from ``grid``."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if not 0 <= anchor < num_tasks:
        raise ValueError(f"anchor must be a task index in [0, {num_tasks}), got {anchor}")
    values = [float(v) for v in grid]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"grid values must be finite and positive, got {list(grid)}")
    if len(set(values)) != len(values):
        raise ValueError(f"grid values must be distinct, got {list(grid)}")
    out = []
    for combo in itertools.product(values, repeat=num_tasks - 1):
        w = list(combo)
        w.insert(anchor, 1.0)
        out.append(w)
    return out


def _merged(records: Sequence[Mapping[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    """``{seed: {task: metrics}}`` of the single-task baselines' ``key`` metrics."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        out.setdefault(int(r["seed"]), {}).update(r.get(key) or {})
    return out


def _score(
    runs: Sequence[Mapping[str, Any]],
    baselines: Mapping[int, Mapping[str, Any]],
    tasks: Sequence[Any],
    which: Mapping[str, Sequence[str]] | None,
) -> tuple[float, int]:
    """Mean validation Δm over the seeds and the number of seeds it could be computed on."""
    values = []
    for r in runs:
        if not r.get("valid_metrics"):
            continue
        dm = report.delta_m_for(r["valid_metrics"], baselines.get(int(r["seed"]), {}), tasks, which)
        if dm is not None:
            values.append(dm)
    if not values:
        return float("nan"), 0
    return sum(values) / len(values), len(values)


def run_tune_static(
    cfg: dict[str, Any],
    seeds: Sequence[int],
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    anchor: int = 0,
    progress: bool | None = None,
    log: runner.Log = runner._quiet,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train every grid vector on every tuning seed; the results dict with ``"tuned"``.

    Raises ``ValueError`` when no grid point trained (every run failed).
    """
    t_start = time.perf_counter()
    num_tasks = runner.load_splits(cfg, int(seeds[0])).num_tasks
    vectors = static_weight_grid(num_tasks, grid, anchor)
    variants = [
        {"balancer": "equal", "options": {"weights": w}, "value": w, "param": "weights"}
        for w in vectors
    ]
    # ``jobs`` processes share the grid: each (seed, slice of the grid) is one job; the first
    # slice of a seed also trains its single-task baselines
    slices = max(1, min(jobs, len(variants)))
    parts = runner.run_jobs(
        runner._seed_job,
        [(cfg, seed, variants[i::slices], i == 0) for seed in seeds for i in range(slices)],
        jobs=jobs,
        progress=progress,
        log=log,
    )
    results = {"task": cfg["task"], **runner._collect(parts)}
    baselines = _merged(results["single_task"], "valid_metrics")
    which = cfg.get("delta_m_metrics")
    scores = []
    for i, w in enumerate(vectors):
        mine = [r for r in results["runs"] if r.get("value") == w]
        score, n = _score(mine, baselines, results["tasks"], which)
        scores.append({"index": i, "weights": w, "valid_delta_m": score, "seeds": n})
    ok = [s for s in scores if math.isfinite(s["valid_delta_m"])]
    if not ok:
        raise ValueError(
            "tune-static: no grid point produced validation metrics (every run failed)"
        )
    best = max(ok, key=lambda s: (s["valid_delta_m"], -s["index"]))
    num_runs = len(vectors) * len(seeds)
    tuned = TunedStatic(
        weights=best["weights"],
        valid_delta_m=best["valid_delta_m"],
        num_runs=num_runs,
        single_task_runs=num_tasks * len(seeds),
        grid=[float(v) for v in grid],
        anchor=anchor,
        tune_seeds=list(seeds),
        task=cfg["task"],
        config={k: cfg.get(k) for k in _MATCHED_KEYS},
        selection="max mean validation Δm vs the single-task baselines (delta_m_metrics), "
        "over the tuning seeds; the test split is not used",
    )
    return {
        **results,
        "config": cfg,
        "kind": "tune-static",
        "seeds": list(seeds),
        "scores": scores,
        "tuned": dict(tuned),
        "environment": runner.environment(),
        "jobs": jobs,
        "wall_time_s": time.perf_counter() - t_start,
    }


def tune_table(results: Mapping[str, Any], top: int = 15) -> str:
    """Markdown: the best grid points by validation Δm, and the choice."""
    tuned = results["tuned"]
    names = [t["name"] for t in results.get("tasks", [])]
    lines = [
        f"## {results.get('task', '?')}: tuned static weights",
        "",
        f"Grid: w[{names[tuned['anchor']] if names else tuned['anchor']}] = 1, every other "
        f"weight in {tuned['grid']}; {tuned['num_runs']} training runs (+ "
        f"{tuned['single_task_runs']} single-task runs for the reference) on tuning seed(s) "
        f"{', '.join(map(str, tuned['tune_seeds']))}. Score: {tuned['selection']}.",
        "",
        "| rank | " + " | ".join(f"w {n}" for n in names) + " | validation Δm % ↑ |",
        "|---:|" + "---:|" * len(names) + "---:|",
    ]
    ranked = sorted(
        results["scores"],
        key=lambda s: -s["valid_delta_m"] if math.isfinite(s["valid_delta_m"]) else math.inf,
    )
    for rank, s in enumerate(ranked[:top], 1):
        cells = [f"{w:g}" for w in s["weights"]]
        dm = s["valid_delta_m"]
        lines.append(
            f"| {rank} | " + " | ".join(cells) + f" | {dm:+.2f} |"
            if math.isfinite(dm)
            else f"| {rank} | " + " | ".join(cells) + " | failed |"
        )
    lines += [
        "",
        f"Chosen: weights {tuned['weights']} (validation Δm {tuned['valid_delta_m']:+.2f} %). "
        f"Pass this directory to `compare --tuned-static` to train them on the comparison's "
        f"seeds: the row is named '{tuned_label(tuned['num_runs'])}'.",
        "",
        f"_total wall time {results.get('wall_time_s', float('nan')):.0f} s._",
    ]
    return "\n".join(lines) + "\n"


def load_tuned(path: str | Path, cfg: Mapping[str, Any]) -> TunedStatic:
    """Read ``tuned.json`` (a file, or a directory holding one) and check that it was tuned on
    the same task, data, model and training settings as ``cfg``; ``ValueError`` names the
    first key that differs (or the file when it is missing or malformed)."""
    import json

    p = Path(path)
    f = p / TUNED_FILE if p.is_dir() else p
    if not f.is_file():
        raise ValueError(
            f"--tuned-static: {f} not found (run `python -m experiments tune-static ... --out "
            f"{p}` first)"
        )
    try:
        data = json.loads(f.read_text())
        weights = [float(w) for w in data["weights"]]
        num_runs = int(data["num_runs"])
        tuned_cfg = dict(data["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--tuned-static: {f} is not a tune-static result ({e!r})") from e
    for key in _MATCHED_KEYS:
        if tuned_cfg.get(key) != cfg.get(key):
            raise ValueError(
                f"--tuned-static: {f} was tuned with {key} = {tuned_cfg.get(key)!r} but this "
                f"comparison uses {key} = {cfg.get(key)!r}; tune again with the same settings"
            )
    return TunedStatic({**data, "weights": weights, "num_runs": num_runs, "file": str(f)})
