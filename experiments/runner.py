"""Training runs behind the command line: one run, balancer comparisons, parameter sweeps.

Everything returns plain JSON-friendly dicts; printing and files are the caller's business
(:mod:`experiments.cli`), except the optional ``log`` callback and tqdm bars.
"""

from __future__ import annotations

import copy
import platform
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from balancers.registry import _ALIASES as _REGISTRY_ALIASES
from balancers.registry import BALANCERS, GROUPS, balancer_class, make_balancer
from mtl import BalancedOptimizer
from mtl import metrics as mtl_metrics
from mtl.models import build_model
from mtl.train import fit

from . import report

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

Log = Callable[[str], None]

#: spellings accepted for registry names: the registry's own (``nash-mtl``, ``multibalance-s``...)
#: and these
_ALIASES = {
    **_REGISTRY_ALIASES,
    "equalweight": "equal",
    "ew": "equal",
    "mgda-ub": "mgda",
    "mgda_ub": "mgda",
}


class BalancerError(ValueError):
    """An unknown balancer, or one whose module is not available."""


def _quiet(_msg: str) -> None:
    return None


# ---------------------------------------------------------------------------- balancers
def canonical_balancer(name: str) -> str:
    """The registry key of ``name`` (case-insensitive, aliases resolved)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BALANCERS:
        raise BalancerError(f"unknown balancer {name!r}; choose from {', '.join(BALANCERS)}")
    return key


def balancer_status(name: str) -> str | None:
    """``None`` when the balancer imports, else why it does not."""
    try:
        balancer_class(name)
    except ModuleNotFoundError as e:
        return f"module {e.name!r} not found (not written yet?)"
    except Exception as e:  # a module that exists but fails to import
        return f"import failed: {type(e).__name__}: {e}"
    return None


def resolve_balancers(spec: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Balancer names to run and the unavailable ones (``{name: reason}``).

    ``"all"`` means every registered balancer, and a group name (``balancers.registry.GROUPS``:
    ``core``, ``loss``, ``baselines``) its members; balancers brought in that way whose module
    cannot be imported (or that are not registered) are returned as unavailable (the caller
    reports and skips them). Explicitly named balancers must exist and import, else
    :class:`BalancerError`.
    """
    if isinstance(spec, str):
        items = [s for s in (x.strip() for x in spec.split(",")) if s]
    else:
        items = [str(s).strip() for s in spec]
    if not items:
        raise BalancerError("no balancer given")
    # (name, strict): balancers brought in by "all" or a group may be missing; named ones may not
    candidates: list[tuple[str, bool]] = []
    for s in items:
        if s.lower() == "all":
            candidates += [(b, False) for b in BALANCERS]
        elif s.lower() in GROUPS:
            candidates += [(b, False) for b in GROUPS[s.lower()]]
        else:
            candidates.append((s, True))
    names: list[str] = []
    unavailable: dict[str, str] = {}
    for raw, strict in candidates:
        if not strict and str(raw).strip().lower() not in BALANCERS:
            # a group member that is not registered yet (GROUPS may list it ahead of its module)
            unavailable.setdefault(str(raw).strip().lower(), "not registered (not written yet?)")
            continue
        key = canonical_balancer(raw)
        if key in names or (key in unavailable and not strict):
            continue
        why = balancer_status(key)
        if why is None:
            names.append(key)
        elif strict:
            raise BalancerError(f"balancer {raw!r} is not available: {why}")
        else:
            unavailable[key] = why
    return names, unavailable


def _takes_seed(balancer: str) -> bool:
    """Whether the balancer's constructor takes a ``seed`` (class flag ``accepts_seed``)."""
    return bool(balancer_class(balancer).accepts_seed)


def accepts_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.backward`` wants a ``closure`` (class flag ``needs_closure``)."""
    return isinstance(optimizer, BalancedOptimizer) and bool(type(optimizer).needs_closure)


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


_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


def build_inner_optimizer(cfg: Mapping[str, Any], params: Iterable[Any]) -> torch.optim.Optimizer:
    """The inner ``torch.optim`` optimizer of ``cfg["optimizer"]`` (``name`` + options)."""
    opts = dict(cfg.get("optimizer", {"name": "adam"}))
    name = str(opts.pop("name", "adam")).lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(_OPTIMIZERS)}")
    inner: torch.optim.Optimizer = _OPTIMIZERS[name](params, **opts)
    return inner


_SCHEDULERS = ("cosine", "step", "none")


def build_scheduler(cfg: Mapping[str, Any], inner: torch.optim.Optimizer) -> Any:
    """The per-epoch LR scheduler of ``cfg["scheduler"]`` (``None`` when absent).

    ``{"name": "cosine"}``: cosine annealing over ``train.epochs`` down to ``eta_min``
    (default 0); ``{"name": "step", "step_size": 10, "gamma": 0.5}``; ``"none"``/``null``.
    """
    spec = cfg.get("scheduler")
    if spec is None:
        return None
    opts = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(opts.pop("name", "none")).lower()
    if name == "none":
        return None
    if name == "cosine":
        opts.setdefault("T_max", max(1, int(cfg.get("train", {}).get("epochs", 10))))
        return torch.optim.lr_scheduler.CosineAnnealingLR(inner, **opts)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(inner, **opts)
    raise ValueError(f"unknown scheduler {name!r}; choose from {_SCHEDULERS}")


def build_regularizer(cfg: Mapping[str, Any], seed: int) -> Any:
    """LSPR / SCR from the config's ``regularizer`` section (``{"name": "lspr", ...options}``),
    seeded with the run's seed; ``None`` for ``"none"`` or no section."""
    spec = dict(cfg.get("regularizer") or {})
    name = str(spec.pop("name", "none")).lower()
    if name in ("none", ""):
        return None
    from balancers import LSPR, SCR

    classes = {"lspr": LSPR, "scr": SCR}
    if name not in classes:
        raise ValueError(f"unknown regularizer {name!r}; choose none, scr or lspr")
    spec.setdefault("seed", seed)
    return classes[name](**spec)


def _model_kwargs(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    m = dict(cfg.get("model", {}))
    name = m.pop("name", "mmoe")
    for key, value in list(m.items()):
        if isinstance(value, list):
            m[key] = tuple(value)
    return str(name), m


def environment() -> dict[str, Any]:
    """Versions and thread settings recorded with every result file."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- group metrics
#: binary-task metrics the runner adds to what :func:`mtl.train.evaluate` reports: ``gauc``
#: (:func:`mtl.metrics.gauc`, needs group ids; always added when the data has them) and
#: ``calibration`` (:func:`mtl.metrics.calibration`; added when a metric list names it).
EXTRA_BINARY_METRICS = ("gauc", "calibration")

_GROUP_HINT = (
    "give the data a group column (CSV task: --set data.group_column=COLUMN, e.g. the user or "
    "query id) or remove 'gauc' from the metric lists"
)


def _has_groups(splits: Any) -> bool:
    return bool(getattr(splits, "has_groups", False))


def _requested(cfg: Mapping[str, Any], kind: str) -> list[str]:
    """Metric names of task ``kind`` in ``table_metrics`` and ``delta_m_metrics``."""
    names: list[str] = []
    for key in ("table_metrics", "delta_m_metrics"):
        for name in (cfg.get(key) or {}).get(kind, []) or []:
            if name not in names:
                names.append(str(name))
    return names


def check_metric_names(cfg: Mapping[str, Any], has_groups: bool) -> None:
    """Raise :class:`tasks.DataError` (a ``ValueError``) for metrics the run cannot report:
    ``gauc`` in ``table_metrics``/``delta_m_metrics`` without group ids, or a ``delta_m_metrics``
    name without a known direction (:data:`experiments.report.HIGHER_IS_BETTER`)."""
    from tasks import DataError

    for key in ("table_metrics", "delta_m_metrics"):
        for kind, names in (cfg.get(key) or {}).items():
            if "gauc" in (names or []) and not has_groups:
                raise DataError(
                    f"{key}.{kind} names 'gauc' (group AUC) but the data has no group ids: "
                    + _GROUP_HINT
                )
    for kind, names in (cfg.get("delta_m_metrics") or {}).items():
        unknown = [n for n in names or [] if n not in report.HIGHER_IS_BETTER]
        if unknown:
            raise DataError(
                f"delta_m_metrics.{kind} names {unknown}, whose direction (higher or lower is "
                f"better) is unknown; use some of {sorted(report.HIGHER_IS_BETTER)}"
            )


def _extra_names(cfg: Mapping[str, Any], has_groups: bool) -> list[str]:
    """The :data:`EXTRA_BINARY_METRICS` this run computes."""
    wanted = _requested(cfg, "binary")
    return [
        m
        for m in EXTRA_BINARY_METRICS
        if (m == "gauc" and has_groups) or (m == "calibration" and m in wanted)
    ]


def with_group_metrics(cfg: Mapping[str, Any], has_groups: bool) -> dict[str, Any]:
    """``cfg`` (a shallow copy) whose ``table_metrics.binary`` lists ``gauc`` (after ``auc``)
    when the data has group ids, so that the tables report GAUC; ``cfg`` unchanged otherwise."""
    out = dict(cfg)
    table = dict(out.get("table_metrics") or {"binary": ["auc", "ne"], "regression": ["mse"]})
    binary = list(table.get("binary") or [])
    if not has_groups or "gauc" in binary:
        return out
    binary.insert(binary.index("auc") + 1 if "auc" in binary else len(binary), "gauc")
    table["binary"] = binary
    out["table_metrics"] = table
    return out


def _predict_logits(model: Any, dataset: Any, batch_size: int) -> list[torch.Tensor]:
    """The K outputs of ``model`` on ``dataset`` in row order, float64 on the CPU."""
    device = next(model.parameters()).device
    k = dataset.num_tasks
    parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for features, _ in dataset.batches(int(batch_size)):
                out = model(features.to(device))
                for i, o in enumerate(out.task_outputs):
                    parts[i].append(o.detach().reshape(-1).to("cpu", torch.float64))
    finally:
        model.train(was_training)
    return [torch.cat(p) if p else torch.zeros(0, dtype=torch.float64) for p in parts]


def extra_metrics(
    model: Any, dataset: Any, names: Sequence[str], *, batch_size: int = 4096
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the binary tasks for ``names`` (some of
    :data:`EXTRA_BINARY_METRICS`) on ``dataset`` (rows in order; ``gauc`` reads
    ``dataset.groups``). A metric that is undefined on this data (no group with both classes,
    no positive label, no rows) is NaN, like AUC on a single-class split."""
    names = [n for n in names if n in EXTRA_BINARY_METRICS]
    binary = [k for k, t in enumerate(dataset.tasks) if t.kind == "binary"]
    if not names or not binary or len(dataset) == 0:
        return {dataset.tasks[k].name: dict.fromkeys(names, float("nan")) for k in binary}
    if "gauc" in names and getattr(dataset, "groups", None) is None:
        from tasks import DataError

        raise DataError("metric 'gauc' (group AUC) needs group ids: " + _GROUP_HINT)
    logits = _predict_logits(model, dataset, batch_size)
    targets = dataset.targets
    out: dict[str, dict[str, float]] = {}
    for k in binary:
        y = targets[k].detach().to("cpu", torch.float64)
        row: dict[str, float] = {}
        for name in names:
            try:
                if name == "gauc":
                    row[name] = mtl_metrics.gauc(y, logits[k], dataset.groups)
                else:
                    row[name] = mtl_metrics.calibration(y, logits[k], from_logits=True)
            except ValueError:  # undefined on this split (e.g. no group holds both classes)
                row[name] = float("nan")
        out[dataset.tasks[k].name] = row
    return out


def _merge(
    metrics: Mapping[str, Mapping[str, float]] | None, extra: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]] | None:
    if metrics is None:
        return None
    return {t: {**m, **extra.get(t, {})} for t, m in metrics.items()}


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
    extra: dict[str, Any] = {}
    if "seed" not in options and _takes_seed(balancer):
        extra["seed"] = int(seed)  # e.g. PCGrad's random order: independent across seeds
    opt = make_balancer(
        balancer, inner, splits.num_tasks, task_names=splits.task_names, **dict(options), **extra
    )
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
    test_metrics: dict[str, dict[str, float]] | None = result.test_metrics
    valid_metrics: dict[str, dict[str, float]] | None = result.valid_metrics
    extra_names = _extra_names(cfg, _has_groups(splits))
    if extra_names:
        eval_bs = int(train_cfg.get("eval_batch_size", 4096))
        valid_metrics = _merge(
            valid_metrics, extra_metrics(model, splits.valid, extra_names, batch_size=eval_bs)
        )
        if test_metrics is not None:
            test_metrics = _merge(
                test_metrics, extra_metrics(model, splits.test, extra_names, batch_size=eval_bs)
            )
    record: dict[str, Any] = {
        "balancer": balancer,
        "options": dict(options),
        "seed": int(seed),
        "metrics": test_metrics,
        "valid_metrics": valid_metrics,
        "step_time_s": result.step_time_s,
        "step_time_mean_s": result.step_time_mean_s,
        "iter_time_s": result.iter_time_s,
        "epochs": result.epochs,
        "steps": result.steps,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "weights_mean": result.weights_mean,
        "weights_kind": getattr(type(opt), "weights_kind", "weights"),
        "weights_trace": [[s, w] for s, w in result.weights_trace],
        "train_time_s": result.train_time_s,
    }
    if keep_history:
        record["history"] = [
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
    return record


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


# ---------------------------------------------------------------------------- jobs
def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


def _in_worker(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, list[str]]:
    lines: list[str] = []
    return fn(*args, progress=False, log=lines.append), lines


def run_jobs(
    fn: Callable[..., Any],
    arg_list: Sequence[tuple[Any, ...]],
    *,
    jobs: int = 1,
    progress: bool | None = None,
    log: Log = _quiet,
) -> list[Any]:
    """``[fn(*args, progress=..., log=...) for args in arg_list]``, in ``jobs`` processes.

    With ``jobs > 1`` the calls run in spawned worker processes (one torch thread each, no
    progress bars); their log lines are printed when a call finishes. Results keep the order
    of ``arg_list``.
    """
    if jobs <= 1 or len(arg_list) <= 1:
        return [fn(*args, progress=progress, log=log) for args in arg_list]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(arg_list)
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(arg_list)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(torch.get_num_threads(),),
    ) as pool:
        futures = {pool.submit(_in_worker, fn, args): i for i, args in enumerate(arg_list)}
        for fut in as_completed(futures):
            value, lines = fut.result()
            for line in lines:
                log(line)
            results[futures[fut]] = value
    return results


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
