"""Training runs behind the command line: one run, balancer comparisons, parameter sweeps.

Everything returns plain JSON-friendly dicts; printing and files are the caller's business
(:mod:`experiments.cli`), except the optional ``log`` callback and tqdm bars.
"""

from __future__ import annotations

import copy
import platform
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from balancers.registry import make_balancer
from mtl import BalancedOptimizer
from mtl.models import build_model
from mtl.train import TrainResult, fit

from . import report

# names re-exported from the modules they moved to: other code and tests import them from here
from ._balancers import (  # noqa: F401
    _ALIASES,
    BalancerError,
    _takes_seed,
    accepts_closure,
    balancer_status,
    canonical_balancer,
    resolve_balancers,
)
from ._build import (  # noqa: F401
    _OPTIMIZERS,
    _SCHEDULERS,
    _model_kwargs,
    build_inner_optimizer,
    build_regularizer,
    build_scheduler,
)
from ._jobs import Log, _in_worker, _quiet, _worker_init, run_jobs  # noqa: F401
from ._metrics import (  # noqa: F401
    _GROUP_HINT,
    EXTRA_BINARY_METRICS,
    _extra_names,
    _has_groups,
    _merge,
    _predict_logits,
    _requested,
    check_metric_names,
    extra_metrics,
    with_group_metrics,
)

__all__ = [
    "BalancerError",
    "build_inner_optimizer",
    "canonical_balancer",
    "check_metric_names",
    "environment",
    "extra_metrics",
    "load_splits",
    "resolve_balancers",
    "run_compare",
    "run_sweep",
    "single_task_splits",
    "train_one",
    "with_group_metrics",
]


# ---------------------------------------------------------------------------- data and models
def load_splits(cfg: Mapping[str, Any], seed: int) -> Any:
    """The :class:`tasks.DataSplits` of the configuration for ``seed``.

    The run seed is passed to the loader as ``seed`` (data generation for synthetic, the
    stratified split for census) unless the configuration fixes ``data.seed``.
    """
    from tasks import load_task

    options = dict(cfg.get("data", {}))
    options.setdefault("seed", int(seed))
    splits = load_task(cfg["task"], **options)
    check_metric_names(cfg, _has_groups(splits))
    return splits


def single_task_splits(splits: Any, k: int) -> Any:
    """``splits`` restricted to task ``k`` (same rows, features and group ids)."""
    from tasks import DataSplits, TabularDataset

    def one(ds: Any) -> Any:
        return TabularDataset(
            ds.x_num, ds.x_cat, ds.y[:, k : k + 1], ds.schema, [ds.tasks[k]],
            groups=getattr(ds, "groups", None), _validate=False,
        )  # fmt: skip

    return DataSplits(
        one(splits.train),
        one(splits.valid),
        one(splits.test),
        f"{splits.name}/{splits.tasks[k].name}",
        dict(splits.info),
    )


def environment() -> dict[str, Any]:
    """Versions and thread settings recorded with every result file."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- one run
def train_one(
    cfg: Mapping[str, Any],
    splits: Any,
    balancer: str,
    options: Mapping[str, Any],
    seed: int,
    *,
    progress: bool | None = None,
    desc: str | None = None,
    keep_history: bool = True,
) -> dict[str, Any]:
    """Train one model with one balancer on ``splits``; returns the run record.

    The model is initialised after ``torch.manual_seed(seed)``; :func:`mtl.train.fit` seeds
    the shuffling and dropout with the same seed. Binary tasks also get ``gauc`` when the data
    has group ids and ``calibration`` when a metric list names it (:func:`extra_metrics`, on
    the model :func:`~mtl.train.fit` returns); ``gauc`` requested without group ids raises
    before training (:func:`check_metric_names`).
    """
    check_metric_names(cfg, _has_groups(splits))
    train_cfg = dict(cfg.get("train", {}))
    name, model_kwargs = _model_kwargs(cfg)
    torch.manual_seed(int(seed))
    model = build_model(name, **splits.model_kwargs(), **model_kwargs)
    inner = build_inner_optimizer(cfg, model.parameters())
    opt = _make_balancer(balancer, inner, splits, options, seed)
    scheduler = build_scheduler(cfg, inner)
    regularizer = build_regularizer(cfg, int(seed))
    result = fit(
        model,
        splits,
        opt,
        level=train_cfg.get("level", "representation"),
        epochs=int(train_cfg.get("epochs", 10)),
        batch_size=int(train_cfg.get("batch_size", 256)),
        early_stopping_patience=train_cfg.get("early_stopping_patience"),
        eval_every=int(train_cfg.get("eval_every", 1)),
        seed=int(seed),
        progress=progress,
        selection_metric=train_cfg.get("selection_metric"),
        max_steps=train_cfg.get("max_steps"),
        eval_batch_size=int(train_cfg.get("eval_batch_size", 4096)),
        scheduler=scheduler,
        device=train_cfg.get("device") or "cpu",
        desc=desc,
        regularizer=regularizer,
    )
    valid_metrics, test_metrics = _final_metrics(cfg, model, splits, result)
    record: dict[str, Any] = {
        "balancer": balancer,
        "options": dict(options),
        "seed": int(seed),
        "metrics": test_metrics,
        "valid_metrics": valid_metrics,
        **_result_fields(result),
        "weights_kind": getattr(type(opt), "weights_kind", "weights"),
        "weights_trace": [[s, w] for s, w in result.weights_trace],
        "train_time_s": result.train_time_s,
    }
    if keep_history:
        record["history"] = _history(result)
    return record


def _make_balancer(
    balancer: str,
    inner: torch.optim.Optimizer,
    splits: Any,
    options: Mapping[str, Any],
    seed: int,
) -> BalancedOptimizer:
    """Balancer ``balancer`` with ``options`` around ``inner``; a balancer that takes a seed
    and is not given one in ``options`` gets the run's ``seed``."""
    extra: dict[str, Any] = {}
    if "seed" not in options and _takes_seed(balancer):
        extra["seed"] = int(seed)  # e.g. PCGrad's random order: independent across seeds
    return make_balancer(
        balancer, inner, splits.num_tasks, task_names=splits.task_names, **dict(options), **extra
    )


def _final_metrics(
    cfg: Mapping[str, Any], model: torch.nn.Module, splits: Any, result: TrainResult
) -> tuple[dict[str, dict[str, float]] | None, dict[str, dict[str, float]] | None]:
    """The validation and test metrics of ``result`` (the test ones ``None`` when not
    evaluated), with the extra binary metrics (:func:`extra_metrics`) of ``model`` merged in."""
    test_metrics: dict[str, dict[str, float]] | None = result.test_metrics
    valid_metrics: dict[str, dict[str, float]] | None = result.valid_metrics
    extra_names = _extra_names(cfg, _has_groups(splits))
    if extra_names:
        eval_bs = int(dict(cfg.get("train", {})).get("eval_batch_size", 4096))
        valid_metrics = _merge(
            valid_metrics, extra_metrics(model, splits.valid, extra_names, batch_size=eval_bs)
        )
        if test_metrics is not None:
            test_metrics = _merge(
                test_metrics, extra_metrics(model, splits.test, extra_names, batch_size=eval_bs)
            )
    return valid_metrics, test_metrics


def _result_fields(result: TrainResult) -> dict[str, Any]:
    """The timings, lengths and mean weights of a :func:`~mtl.train.fit` result, as the run
    record lists them."""
    return {
        "step_time_s": result.step_time_s,
        "step_time_mean_s": result.step_time_mean_s,
        "iter_time_s": result.iter_time_s,
        "epochs": result.epochs,
        "steps": result.steps,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "weights_mean": result.weights_mean,
    }


def _history(result: TrainResult) -> list[dict[str, Any]]:
    """The per-epoch history of a :func:`~mtl.train.fit` result, as the run record keeps it."""
    return [
        {
            "epoch": h["epoch"],
            "train_loss": h["train_loss"],
            "score": h.get("score"),
            "valid": h.get("valid"),
            "weights_mean": h["weights_mean"],
            "step_time_s": h["step_time_s"],
        }
        for h in result.history
    ]


def _failed(
    balancer: str, options: Mapping[str, Any], seed: int, exc: BaseException
) -> dict[str, Any]:
    tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return {
        "balancer": balancer,
        "options": dict(options),
        "seed": int(seed),
        "error": tb,
        "metrics": None,
        "step_time_s": None,
        "epochs": None,
        "weights_mean": None,
    }


def single_task_baselines(
    cfg: Mapping[str, Any],
    splits: Any,
    seed: int,
    *,
    progress: bool | None,
    log: Log,
) -> list[dict[str, Any]]:
    """One model per task (``num_tasks=1``, plain loss) on the same data; one record each."""
    out = []
    for k, spec in enumerate(splits.tasks):
        st = single_task_splits(splits, k)
        t0 = time.perf_counter()
        rec = train_one(
            cfg, st, "equal", {}, seed, progress=progress,
            desc=f"single-task {spec.name} seed {seed}", keep_history=False,
        )  # fmt: skip
        rec = {"task": spec.name, **{k2: v for k2, v in rec.items() if k2 != "balancer"}}
        log(
            f"  single-task {spec.name:>14s} seed {seed}: "
            f"{report.short_metrics(rec['metrics'])} ({time.perf_counter() - t0:.1f}s)"
        )
        out.append(rec)
    return out


def _attach_delta_m(
    record: dict[str, Any],
    baselines: list[dict[str, Any]],
    splits_tasks: Sequence[Any],
    cfg: Mapping[str, Any],
) -> None:
    if record.get("metrics") is None or not baselines:
        return
    base = {b["task"]: b["metrics"][b["task"]] for b in baselines}
    record["delta_m"] = report.delta_m_for(
        record["metrics"], base, splits_tasks, cfg.get("delta_m_metrics")
    )


def _balancer_options(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict((cfg.get("balancers") or {}).get(name) or {})


def _seed_job(
    cfg: dict[str, Any],
    seed: int,
    variants: Sequence[Mapping[str, Any]],
    single_task: bool,
    *,
    progress: bool | None,
    log: Log,
) -> dict[str, Any]:
    """Everything one seed needs: its data, single-task baselines, one run per variant
    (``{"balancer", "options"[, "value"]}``)."""
    t0 = time.perf_counter()
    splits = load_splits(cfg, seed)
    log(
        f"seed {seed}: {splits.name} train/valid/test = {len(splits.train)}/"
        f"{len(splits.valid)}/{len(splits.test)} ({time.perf_counter() - t0:.1f}s)"
    )
    baselines: list[dict[str, Any]] = []
    if single_task:
        baselines = single_task_baselines(cfg, splits, seed, progress=progress, log=log)
    runs: list[dict[str, Any]] = []
    for var in variants:
        name, options = var["balancer"], dict(var["options"])
        label = var.get("label") or (
            name if "value" not in var else f"{var.get('param')}={var['value']}"
        )
        t0 = time.perf_counter()
        try:
            rec = train_one(
                cfg, splits, name, options, seed, progress=progress,
                desc=f"{label if 'value' not in var else name + ' ' + label} seed {seed}",
            )  # fmt: skip
        except Exception as e:  # keep comparing the others
            rec = _failed(name, options, seed, e)
            log(f"  {label:>26s} seed {seed}: FAILED: {rec['error']}")
        else:
            _attach_delta_m(rec, baselines, splits.tasks, cfg)
            dm = rec.get("delta_m")
            log(
                f"  {label:>26s} seed {seed}: {report.short_metrics(rec['metrics'])}"
                + (f"  Δm {dm:+.2f}%" if dm is not None else "")
                + f"  step {1e3 * rec['step_time_s']:.2f} ms, {rec['epochs']} epochs"
                f" ({time.perf_counter() - t0:.1f}s)"
            )
        if "value" in var:
            rec["value"] = var["value"]
        if var.get("label"):
            rec["variant"] = var["label"]  # its own row in the tables (e.g. tuned weights)
        runs.append(rec)
    return {
        "tasks": [{"name": t.name, "kind": t.kind} for t in splits.tasks],
        "data": _json_info(splits),
        "runs": runs,
        "single_task": baselines,
    }


def _collect(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "tasks": parts[0]["tasks"] if parts else [],
        "data": parts[0]["data"] if parts else {},
        "runs": [r for p in parts for r in p["runs"]],
        "single_task": [b for p in parts for b in p["single_task"]],
    }


# ---------------------------------------------------------------------------- compare
def run_compare(
    cfg: dict[str, Any],
    balancers: Sequence[str],
    seeds: Sequence[int],
    *,
    single_task: bool,
    unavailable: Mapping[str, str] | None = None,
    progress: bool | None = None,
    log: Log = _quiet,
    jobs: int = 1,
    extra_variants: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Every balancer × every seed on the configured task (plus single-task baselines).

    ``extra_variants``: more runs per seed, ``{"balancer", "options", "label"}`` each (e.g. the
    tuned static weights of :mod:`experiments.tune_static`), listed under their ``label``.

    Returns the results dict written to ``results.json``:
    ``{"task", "config", "runs": [...], "single_task": [...], "unavailable": {...}, ...}``.
    A run that raises is recorded with an ``"error"`` and the comparison goes on. ``jobs > 1``
    runs the seeds in parallel processes.
    """
    t_start = time.perf_counter()
    variants = [{"balancer": b, "options": _balancer_options(cfg, b)} for b in balancers]
    variants += [dict(v) for v in extra_variants]
    parts = run_jobs(
        _seed_job,
        [(cfg, seed, variants, single_task) for seed in seeds],
        jobs=jobs,
        progress=progress,
        log=log,
    )
    collected = _collect(parts)
    return {
        "task": cfg["task"],
        **collected,
        "config": with_group_metrics(cfg, bool(collected["data"].get("has_groups"))),
        "balancers": list(balancers),
        "seeds": list(seeds),
        "unavailable": dict(unavailable or {}),
        "environment": environment(),
        "jobs": jobs,
        "wall_time_s": time.perf_counter() - t_start,
    }


def _json_info(splits: Any) -> dict[str, Any]:
    """JSON-safe summary of the data (sizes, tasks, a few scalar facts from ``info``)."""
    out: dict[str, Any] = {
        "name": splits.name,
        "sizes": {
            "train": len(splits.train),
            "valid": len(splits.valid),
            "test": len(splits.test),
        },
    }
    for k, v in (splits.info or {}).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif k in ("correlation_matrix", "label_correlation", "fractions", "tasks"):
            out[k] = copy.deepcopy(v)
    if _has_groups(splits):
        out["has_groups"] = True
    return out


# ---------------------------------------------------------------------------- sweep
def run_sweep(
    cfg: dict[str, Any],
    balancer: str,
    param: str,
    values: Sequence[Any],
    seeds: Sequence[int],
    *,
    single_task: bool = False,
    progress: bool | None = None,
    log: Log = _quiet,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train once per (parameter value, seed) with ``balancer``; the results dict of the sweep."""
    t_start = time.perf_counter()
    base = _balancer_options(cfg, balancer)
    variants = [
        {"balancer": balancer, "options": {**base, param: v}, "value": v, "param": param}
        for v in values
    ]
    parts = run_jobs(
        _seed_job,
        [(cfg, seed, variants, single_task) for seed in seeds],
        jobs=jobs,
        progress=progress,
        log=log,
    )
    collected = _collect(parts)
    return {
        "task": cfg["task"],
        **collected,
        "config": with_group_metrics(cfg, bool(collected["data"].get("has_groups"))),
        "balancer": balancer,
        "param": param,
        "values": list(values),
        "seeds": list(seeds),
        "environment": environment(),
        "jobs": jobs,
        "wall_time_s": time.perf_counter() - t_start,
    }
