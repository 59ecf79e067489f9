"""A small training loop for multi-task models with any balancer: :func:`fit` and :func:`evaluate`.

One step of :func:`fit` is the loop of DESIGN.md::

    out = model(features)                                   # K task outputs + the balance point
    losses = [loss_k(out.task_outputs[k], y_k) for k]       # BCE-with-logits / MSE per TaskSpec
    optimizer.zero_grad()
    info = optimizer.backward(losses, representation=out.representation)   # or shared_parameters=
    optimizer.step()

with per-epoch validation, early stopping, restore of the best state, a per-epoch history,
checkpoint/resume and step-time measurement. Usage::

    from balancers import MGDA
    from mtl.models import build_model
    from mtl.train import fit
    from tasks import make_synthetic

    splits = make_synthetic(num_samples=4000, seed=0)
    model = build_model("mmoe", **splits.model_kwargs())
    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-3), num_tasks=splits.num_tasks)
    result = fit(model, splits, opt, epochs=10, batch_size=256, early_stopping_patience=3)
    result.test_metrics            # {"task0": {"mse": ...}, "task1": {"mse": ...}}

Nothing here prints; the only output is an optional tqdm progress bar on stderr (``progress``).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics as _metrics
from ._info import BalanceInfo
from ._optimizer import BalancedOptimizer

__all__ = [
    "HIGHER_IS_BETTER",
    "TrainResult",
    "evaluate",
    "fit",
    "selection_score",
    "task_loss_fns",
]

#: direction of every metric :func:`evaluate` reports.
HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "log_loss": False, "ne": False, "mse": False}

LossFn = Callable[[Tensor, Tensor], Tensor]
Regularizer = Callable[..., Any]
Level = Literal["representation", "parameters"]
_LEVELS = ("representation", "parameters")
_CHECKPOINT_VERSION = 1


# ============================================================================ losses / metrics
def _bce(pred: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred, target.to(pred.dtype))


def task_loss_fns(tasks: Sequence[Any]) -> list[LossFn]:
    """One loss function per task: BCE-with-logits (mean) for ``kind == "binary"``, MSE (mean)
    for ``kind == "regression"``. ``tasks`` are :class:`tasks.TaskSpec` (anything with ``.kind``
    and ``.name``)."""
    fns: list[LossFn] = []
    for t in tasks:
        if t.kind == "binary":
            fns.append(_bce)
        elif t.kind == "regression":
            fns.append(_mse)
        else:
            raise ValueError(f"task {t.name!r} has unknown kind {t.kind!r}")
    return fns


def _task_metrics(kind: str, y: Tensor, pred: Tensor) -> dict[str, float]:
    nan = float("nan")
    if kind == "regression":
        return _metrics.regression_metrics(y, pred) if y.numel() else {"mse": nan}
    if y.numel() == 0:
        return {"auc": nan, "log_loss": nan, "ne": nan}
    try:
        return _metrics.binary_metrics(y, pred)
    except ValueError:  # one class only: AUC and NE are undefined, log loss is not
        return {"auc": nan, "log_loss": _metrics.log_loss(y, pred, from_logits=True), "ne": nan}


def evaluate(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 4096,
    *,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task metrics of ``model`` on ``dataset`` (a :class:`tasks.TabularDataset`).

    Binary tasks: ``{"auc", "log_loss", "ne"}`` (:func:`mtl.metrics.binary_metrics`; AUC and NE
    are NaN when the dataset holds a single class). Regression tasks: ``{"mse"}``. The model runs
    in eval mode under ``torch.no_grad()`` and its training mode is restored afterwards.

    Returns:
        ``{task_name: {metric: value}}``.
    """
    tasks = list(dataset.tasks)
    preds: list[list[Tensor]] = [[] for _ in tasks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for features, _ in dataset.batches(int(batch_size)):
                if device is not None:
                    features = features.to(device)
                out = model(features)
                if len(out.task_outputs) != len(tasks):
                    raise ValueError(
                        f"model returned {len(out.task_outputs)} task outputs for a dataset "
                        f"with {len(tasks)} tasks"
                    )
                for k, o in enumerate(out.task_outputs):
                    preds[k].append(o.detach().reshape(-1).to("cpu", torch.float64))
    finally:
        model.train(was_training)
    targets = dataset.targets
    result: dict[str, dict[str, float]] = {}
    for k, t in enumerate(tasks):
        pred = torch.cat(preds[k]) if preds[k] else torch.zeros(0, dtype=torch.float64)
        y = targets[k].detach().to("cpu", torch.float64)
        result[t.name] = _task_metrics(t.kind, y, pred)
    return result


def selection_score(
    metrics: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Any],
    key: str | Callable[[Mapping[str, Mapping[str, float]]], float] | None = None,
) -> float:
    """The validation score to maximise (model selection and early stopping).

    Args:
        metrics: what :func:`evaluate` returned.
        tasks: the task specs (``.name``, ``.kind``).
        key: ``None`` (default): the mean over tasks of AUC (binary) and −MSE (regression);
            a metric name (``"auc"``, ``"ne"``, ``"log_loss"``, ``"mse"``): its mean over the
            tasks that report it, negated when lower is better; ``"task/metric"``: one task's
            metric (negated when lower is better); or a callable ``metrics -> float`` (higher is
            better).

    Returns:
        The score (NaN task values are ignored; NaN when nothing is left).
    """
    if callable(key):
        return float(key(metrics))
    values: list[float] = []
    if key is None:
        for t in tasks:
            m = metrics[t.name]
            values.append(m["auc"] if t.kind == "binary" else -m["mse"])
    elif "/" in key:
        name, metric = key.rsplit("/", 1)
        if name not in metrics or metric not in metrics[name]:
            raise ValueError(f"selection metric {key!r} not found in {sorted(metrics)}")
        return _signed(metric, float(metrics[name][metric]))
    else:
        for t in tasks:
            if key in metrics[t.name]:
                values.append(_signed(key, float(metrics[t.name][key])))
        if not values:
            raise ValueError(f"no task reports the selection metric {key!r}")
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def _signed(metric: str, value: float) -> float:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(HIGHER_IS_BETTER)}")
    return value if HIGHER_IS_BETTER[metric] else -value


# ============================================================================ result
@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch: ``epoch``, ``step`` (optimizer steps so far),
            ``train_loss`` ``{task: mean loss}``, ``weights_mean`` (mean balancer coefficients
            over the epoch's steps, averaged over blocks for per-block methods),
            ``step_time_s`` (mean backward+step time), ``epoch_time_s``, ``lr`` (learning rate of
            the first parameter group during the epoch), ``skipped`` (steps
            skipped for non-finite values), and, on evaluated epochs, ``valid``
            (:func:`evaluate` output), ``score`` (:func:`selection_score`) and ``eval_time_s``.
            An epoch cut short by ``max_steps`` is marked ``"partial": True``.
        best_epoch: the epoch whose state was restored (``None`` when no score was finite).
        best_score: its validation score.
        valid_metrics: validation metrics of the returned model.
        test_metrics: test metrics of the returned model (``None`` when not evaluated).
        epochs: number of completed epochs.
        steps: number of optimizer steps.
        stopped_early: whether early stopping ended the run.
        step_time_s: median time of one ``optimizer.backward`` + ``optimizer.step`` (seconds).
        step_time_mean_s: the mean of the same.
        iter_time_s: median time of one whole iteration (forward, losses, backward, step).
        weights_mean: mean coefficients over all steps (``(K,)`` as a list).
        weights_trace: ``[(step, [c_1..c_K]), ...]``: coefficients averaged over consecutive
            windows of steps, at most ``trace_points`` entries (``step`` = last step of a window).
        train_time_s: wall time of the training loop, evaluation included.
        task_names: the K task names.
    """

    history: list[dict[str, Any]]
    best_epoch: int | None
    best_score: float | None
    valid_metrics: dict[str, dict[str, float]]
    test_metrics: dict[str, dict[str, float]] | None
    epochs: int
    steps: int
    stopped_early: bool
    step_time_s: float
    step_time_mean_s: float
    iter_time_s: float
    weights_mean: list[float]
    weights_trace: list[tuple[int, list[float]]]
    train_time_s: float
    task_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (floats, lists and dicts only)."""
        return {
            "task_names": list(self.task_names),
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "valid_metrics": self.valid_metrics,
            "test_metrics": self.test_metrics,
            "epochs": self.epochs,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "step_time_s": self.step_time_s,
            "step_time_mean_s": self.step_time_mean_s,
            "iter_time_s": self.iter_time_s,
            "weights_mean": list(self.weights_mean),
            "weights_trace": [[s, list(w)] for s, w in self.weights_trace],
            "train_time_s": self.train_time_s,
            "history": copy.deepcopy(self.history),
        }


# ============================================================================ loop state
@dataclass
class _Accum:
    """Running sums over the current epoch."""

    num_tasks: int
    loss_sum: list[float] = field(default_factory=list)
    weight_sum: list[float] = field(default_factory=list)
    count: int = 0
    skipped: int = 0
    step_time_sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.loss_sum:
            self.loss_sum = [0.0] * self.num_tasks
        if not self.weight_sum:
            self.weight_sum = [0.0] * self.num_tasks

    def add(self, info: BalanceInfo, step_time: float) -> None:
        self.step_time_sum += step_time
        if info.skipped:
            self.skipped += 1
            return
        losses = info.losses.tolist()
        weights = _mean_weights(info.weights)
        for k in range(self.num_tasks):
            self.loss_sum[k] += losses[k]
            self.weight_sum[k] += weights[k]
        self.count += 1

    def state(self) -> dict[str, Any]:
        return {
            "loss_sum": list(self.loss_sum),
            "weight_sum": list(self.weight_sum),
            "count": self.count,
            "skipped": self.skipped,
            "step_time_sum": self.step_time_sum,
        }

    @classmethod
    def from_state(cls, num_tasks: int, st: Mapping[str, Any]) -> _Accum:
        return cls(
            num_tasks,
            list(st["loss_sum"]),
            list(st["weight_sum"]),
            int(st["count"]),
            int(st["skipped"]),
            float(st["step_time_sum"]),
        )


def _mean_weights(w: Tensor) -> list[float]:
    w = w.detach().to(torch.float64)
    if w.dim() == 2:
        w = w.mean(0)
    return w.reshape(-1).tolist()


@dataclass
class _State:
    num_tasks: int
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches of the current (incomplete) epoch already trained
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    epoch_gen_state: Tensor | None = None
    accum: _Accum | None = None
    weights_steps: list[list[float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    iter_times: list[float] = field(default_factory=list)
    train_time_s: float = 0.0


# ============================================================================ helpers
def _clone_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextmanager
def _capture_output(model: nn.Module) -> Iterator[list[Any]]:
    """Record the outputs of ``model``'s forward calls while the context is open."""
    outputs: list[Any] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        outputs.append(output)

    handle = model.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _is_perturbation(regularizer: Any) -> bool:
    """LSPR/SCR-style regularizers: ``reg(representation, heads, targets, loss_fns, ...)``."""
    return hasattr(regularizer, "replay") and hasattr(regularizer, "state_dict")


def _forward_losses(
    model: nn.Module,
    features: Any,
    targets: Sequence[Tensor],
    loss_fns: Sequence[LossFn],
    kinds: Sequence[str],
    regularizer: Regularizer | None,
) -> tuple[list[Tensor], Any]:
    """The K task losses and the model output whose representation they depend on."""
    if regularizer is not None and not _is_perturbation(regularizer):
        with _capture_output(model) as outputs:
            res = regularizer(model, features, targets, loss_fns)
        if (
            isinstance(res, tuple)
            and len(res) == 2
            and hasattr(res[1], "task_outputs")
            and hasattr(res[1], "representation")
        ):
            return list(res[0]), res[1]
        if not outputs:
            raise ValueError("the regularizer returned losses without ever calling the model")
        return list(res), outputs[0]
    out = model(features)
    if len(out.task_outputs) != len(loss_fns):
        raise ValueError(
            f"model returned {len(out.task_outputs)} task outputs but the data has "
            f"{len(loss_fns)} tasks"
        )
    if regularizer is None:
        return [fn(o, y) for fn, o, y in zip(loss_fns, out.task_outputs, targets)], out
    if out.heads is None:
        raise ValueError(
            "a perturbation regularizer needs ModelOutput.heads (the map from the representation "
            "to the task outputs); the models in mtl.models provide it"
        )
    losses = regularizer(
        out.representation, out.heads, targets, loss_fns, outputs=out.task_outputs, kinds=kinds
    )
    return list(losses), out


def _make_closure(
    level: Level,
    model: nn.Module,
    out: Any,
    features: Any,
    targets: Sequence[Tensor],
    loss_fns: Sequence[LossFn],
    kinds: Sequence[str],
    regularizer: Regularizer | None,
    rng_state: RngState,
    devices: list[int],
) -> Callable[..., list[Tensor]]:
    """The ``closure=`` argument of balancers that take one (MARIGOLD).

    * parameter level: re-runs the model on the same batch with the same dropout masks (the
      random state of the original forward is replayed) and returns the K losses;
    * representation level: maps a (shifted) representation to the K losses through
      ``out.heads`` (everything that does not depend on the representation, e.g. MMoE's gates,
      is reused as computed); with LSPR/SCR the same noise is replayed.
    """
    if level == "parameters":

        def closure() -> list[Tensor]:
            with torch.random.fork_rng(devices=devices):
                _set_rng(rng_state, devices)
                return _forward_losses(model, features, targets, loss_fns, kinds, regularizer)[0]

        return closure
    heads = getattr(out, "heads", None)
    if heads is None:
        raise ValueError(
            "this balancer evaluates the losses at a shifted representation, which needs "
            "ModelOutput.heads; use level='parameters' or a model from mtl.models"
        )
    if regularizer is not None and _is_perturbation(regularizer):
        return regularizer.closure(heads, targets, loss_fns, kinds=kinds)

    def rep_closure(representation: Tensor) -> list[Tensor]:
        return [fn(o, y) for fn, o, y in zip(loss_fns, heads(representation), targets)]

    return rep_closure


RngState = tuple[Tensor, list[Tensor]]


def _rng_devices(dev: torch.device) -> list[int]:
    """CUDA device indices whose RNG matters (dropout on the GPU)."""
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _get_rng(devices: list[int]) -> RngState:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(state: RngState, devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, st in zip(devices, cuda):
        torch.cuda.set_rng_state(st, d)


def _accepts_closure(optimizer: BalancedOptimizer) -> bool:
    try:
        return "closure" in inspect.signature(optimizer.backward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _thin(rows: list[list[float]], points: int) -> list[tuple[int, list[float]]]:
    """Average consecutive windows of per-step rows down to at most ``points`` entries."""
    n = len(rows)
    if n == 0 or points <= 0:
        return []
    if n <= points:
        return [(i + 1, list(r)) for i, r in enumerate(rows)]
    arr = np.asarray(rows, dtype=np.float64)
    edges = np.linspace(0, n, points + 1).round().astype(int)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            out.append((int(b), arr[a:b].mean(0).tolist()))
    return out


def _median(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    warm = list(xs[5:]) if len(xs) > 20 else list(xs)  # drop warm-up steps
    return float(statistics.median(warm))


def _mean(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    warm = list(xs[5:]) if len(xs) > 20 else list(xs)
    return float(sum(warm) / len(warm))


def _fingerprint(level: str, batch_size: int, seed: int, num_tasks: int) -> dict[str, Any]:
    return {
        "level": level,
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_tasks": num_tasks,
    }


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: BalancedOptimizer,
    scheduler: Any,
    state: _State,
    generator: torch.Generator,
    fingerprint: dict[str, Any],
    finished: bool,
    devices: list[int],
    regularizer: Any = None,
) -> None:
    payload = {
        "version": _CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "finished": finished,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "regularizer": regularizer.state_dict() if _is_perturbation(regularizer) else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(d) for d in devices],
            "generator": generator.get_state(),
            "epoch_generator": state.epoch_gen_state,
            "numpy": np.random.get_state(),  # noqa: NPY002 - restore the legacy global RNG too
            "python": random.getstate(),
        },
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "step": state.step,
        "history": state.history,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "best_state": state.best_state,
        "bad_evals": state.bad_evals,
        "stopped_early": state.stopped_early,
        "accum": None if state.accum is None else state.accum.state(),
        "weights_steps": state.weights_steps,
        "step_times": state.step_times,
        "iter_times": state.iter_times,
        "train_time_s": state.train_time_s,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: BalancedOptimizer,
    scheduler: Any,
    generator: torch.Generator,
    fingerprint: dict[str, Any],
    devices: list[int],
    regularizer: Any = None,
) -> tuple[_State, bool]:
    # our own file: it holds numpy/python RNG states, so it is not a weights-only payload
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')!r}")
    saved = payload["fingerprint"]
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {path}: settings differ ({detail})")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if _is_perturbation(regularizer):
        if payload.get("regularizer") is None:
            raise ValueError(f"{path}: the checkpoint holds no regularizer state")
        regularizer.load_state_dict(payload["regularizer"])
    if scheduler is not None:
        if payload.get("scheduler") is None:
            raise ValueError(f"{path}: the checkpoint holds no scheduler state")
        scheduler.load_state_dict(payload["scheduler"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    for d, st in zip(devices, rng.get("cuda") or []):
        torch.cuda.set_rng_state(st, d)
    generator.set_state(rng["generator"])
    np.random.set_state(rng["numpy"])  # noqa: NPY002
    random.setstate(rng["python"])
    k = fingerprint["num_tasks"]
    state = _State(
        num_tasks=k,
        epoch=int(payload["epoch"]),
        batch_in_epoch=int(payload["batch_in_epoch"]),
        step=int(payload["step"]),
        history=list(payload["history"]),
        best_score=float(payload["best_score"]),
        best_epoch=payload["best_epoch"],
        best_state=payload["best_state"],
        bad_evals=int(payload["bad_evals"]),
        stopped_early=bool(payload["stopped_early"]),
        epoch_gen_state=rng["epoch_generator"],
        accum=None if payload["accum"] is None else _Accum.from_state(k, payload["accum"]),
        weights_steps=[list(w) for w in payload["weights_steps"]],
        step_times=list(payload["step_times"]),
        iter_times=list(payload["iter_times"]),
        train_time_s=float(payload["train_time_s"]),
    )
    return state, bool(payload["finished"])


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)


# ============================================================================ fit
def fit(
    model: nn.Module,
    splits: Any,
    optimizer: BalancedOptimizer,
    *,
    level: Level = "representation",
    epochs: int = 10,
    batch_size: int = 256,
    early_stopping_patience: int | None = None,
    eval_every: int = 1,
    seed: int = 0,
    progress: bool | None = None,
    device: torch.device | str = "cpu",
    regularizer: Regularizer | None = None,
    on_step: Callable[[int, BalanceInfo], Any] | None = None,
    before_backward: Callable[[int, list[Tensor], Any], Any] | None = None,
    max_steps: int | None = None,
    selection_metric: str | Callable[[Mapping[str, Mapping[str, float]]], float] | None = None,
    restore_best: bool = True,
    eval_batch_size: int = 4096,
    evaluate_test: bool = True,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    checkpoint_every: int = 1,
    use_closure: bool | None = None,
    scheduler: Any = None,
    trace_points: int = 200,
    desc: str | None = None,
) -> TrainResult:
    """Train ``model`` on ``splits.train`` with a balancer; select on ``splits.valid``.

    Each step: forward, the K task losses (:func:`task_loss_fns`: BCE-with-logits for binary
    tasks, MSE for regression; or ``regularizer``), ``optimizer.zero_grad()``,
    ``optimizer.backward(losses, representation=out.representation)`` (``level=
    "representation"``) or ``shared_parameters=model.shared_parameters()`` (``"parameters"``),
    ``optimizer.step()``. The time of backward + step is measured per step.

    Args:
        model: a multi-task model (``model(features)`` returns ``task_outputs`` and
            ``representation``; ``shared_parameters()`` for the parameter level).
        splits: a :class:`tasks.DataSplits` (``train``, ``valid``, ``test``, ``tasks``).
        optimizer: any :class:`mtl.BalancedOptimizer` over the model's parameters.
        level: gradient source, ``"representation"`` (default) or ``"parameters"``.
        epochs: maximum number of epochs (a resumed run continues up to this number).
        batch_size: training batch size (batches are shuffled every epoch).
        early_stopping_patience: stop after this many evaluations without improvement of the
            validation score (``None``: never stop early).
        eval_every: evaluate on the validation split every this many epochs (the last epoch is
            always evaluated).
        seed: seeds the shuffling generator and torch's global RNG (dropout) at the start of a
            fresh run (model initialisation is the caller's business).
        progress: tqdm progress bar on stderr; ``None`` (default): only when stderr is a TTY.
        device: where the model and the data are moved.
        regularizer: ``callable(model, features, targets, loss_fns)`` returning the K losses to
            balance (or ``(losses, model_output)``), replacing the plain per-task losses; hook for
            loss-term regularizers such as LSPR/SCR. When it returns only the losses, the
            representation is taken from the first forward call of the model inside it.
        on_step: ``callback(step, info)`` after every optimizer step (``step`` counts from 1).
        before_backward: ``callback(step, losses, output)`` after ``zero_grad()`` and before the
            balanced backward of every step (the same ``step`` number ``on_step`` gets next), with
            the K task losses and the model output while their graph is alive: e.g.
            ``lambda s, losses, out: tracker.update_parameter_level(s, losses,
            model.shared_parameters())`` for parameter-level conflict probes. It must not
            free the graph (use ``retain_graph=True`` or ``autograd.grad``).
        max_steps: stop after this many optimizer steps in total (a checkpoint written at that
            point resumes mid-epoch exactly).
        selection_metric: validation score to maximise (see :func:`selection_score`): ``None``
            = mean of AUC (binary) / −MSE (regression); or a metric name, ``"task/metric"``, or
            a callable.
        restore_best: load the best validation state into ``model`` at the end.
        eval_batch_size: batch size of evaluation.
        evaluate_test: compute ``test_metrics`` on ``splits.test`` at the end.
        checkpoint_path: write a checkpoint (model, ``optimizer.state_dict()``, RNG states,
            epoch/step, history, best state) after every ``checkpoint_every`` epochs, at the end,
            and when ``max_steps`` stops the run.
        resume: continue from ``checkpoint_path`` when it exists (fresh start otherwise); the
            continuation is exact (same parameters as an uninterrupted run on CPU). ``level``,
            ``batch_size``, ``seed`` and K must match the checkpoint.
        checkpoint_every: epochs between checkpoints.
        use_closure: pass ``closure=`` to ``optimizer.backward`` (MARIGOLD): at the parameter
            level a zero-argument callable re-running the model on the same batch (same dropout
            masks) and returning the K losses; at the representation level a callable mapping a
            shifted representation to the K losses. ``None`` (default): whenever the
            optimizer's ``backward`` takes a ``closure`` argument.
        scheduler: a learning-rate scheduler of the inner optimizer (e.g.
            ``torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)``), stepped once at
            the end of every epoch and saved in checkpoints.
        trace_points: resolution of ``TrainResult.weights_trace``.
        desc: label of the progress bar.

    Returns:
        A :class:`TrainResult`.
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    if not isinstance(optimizer, BalancedOptimizer):
        raise TypeError(
            f"optimizer must be a BalancedOptimizer (e.g. balancers.EqualWeight), got "
            f"{type(optimizer).__name__}"
        )
    for name, value, minimum in (
        ("epochs", epochs, 0),
        ("batch_size", batch_size, 1),
        ("eval_every", eval_every, 1),
        ("checkpoint_every", checkpoint_every, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if early_stopping_patience is not None and early_stopping_patience < 1:
        raise ValueError(f"early_stopping_patience must be >= 1, got {early_stopping_patience}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")

    tasks = list(splits.tasks)
    k_tasks = len(tasks)
    task_names = [t.name for t in tasks]
    if optimizer.num_tasks is not None and optimizer.num_tasks != k_tasks:
        raise ValueError(
            f"optimizer has num_tasks={optimizer.num_tasks} but the data has {k_tasks}"
        )
    loss_fns = task_loss_fns(tasks)
    kinds = [t.kind for t in tasks]
    dev = torch.device(device)
    model.to(dev)
    train, valid = splits.train.to(dev), splits.valid.to(dev)
    shared = list(model.shared_parameters()) if level == "parameters" else None
    closure_on = _accepts_closure(optimizer) if use_closure is None else bool(use_closure)
    rng_devices = _rng_devices(dev)

    generator = torch.Generator(device=dev)
    fingerprint = _fingerprint(level, batch_size, seed, k_tasks)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume and ckpt is not None and ckpt.exists():
        state, _ = _load_checkpoint(
            ckpt, model, optimizer, scheduler, generator, fingerprint, rng_devices, regularizer
        )
    else:
        state = _State(num_tasks=k_tasks)
        generator.manual_seed(int(seed))
        torch.manual_seed(int(seed))

    def save(done: bool) -> None:
        if ckpt is not None:
            _save_checkpoint(
                ckpt,
                model,
                optimizer,
                scheduler,
                state,
                generator,
                fingerprint,
                done,
                rng_devices,
                regularizer,
            )

    nb = train.num_batches(batch_size)
    total = epochs * nb if max_steps is None else min(epochs * nb, max_steps)
    bar = None
    if _progress_enabled(progress):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=min(state.step, total),
            desc=desc,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            unit="step",
        )

    interrupted = False
    t_start = time.perf_counter() - state.train_time_s
    try:
        while not state.stopped_early and state.epoch < epochs:
            if max_steps is not None and state.step >= max_steps:
                interrupted = True
                break
            if state.batch_in_epoch == 0:
                state.epoch_gen_state = generator.get_state()
                state.accum = _Accum(k_tasks)
            else:
                assert state.epoch_gen_state is not None
                generator.set_state(state.epoch_gen_state)
            accum = state.accum
            assert accum is not None
            model.train()
            t_epoch = time.perf_counter()
            for b, (features, targets) in enumerate(
                train.batches(batch_size, shuffle=True, generator=generator)
            ):
                if b < state.batch_in_epoch:
                    continue  # resumed mid-epoch: these batches were already trained on
                if max_steps is not None and state.step >= max_steps:
                    interrupted = True
                    break
                t_iter = time.perf_counter()
                rng_state = _get_rng(rng_devices) if closure_on else None
                losses, out = _forward_losses(
                    model, features, targets, loss_fns, kinds, regularizer
                )
                optimizer.zero_grad()
                kwargs: dict[str, Any] = (
                    {"representation": out.representation}
                    if level == "representation"
                    else {"shared_parameters": shared}
                )
                if closure_on:
                    assert rng_state is not None
                    kwargs["closure"] = _make_closure(
                        level,
                        model,
                        out,
                        features,
                        targets,
                        loss_fns,
                        kinds,
                        regularizer,
                        rng_state,
                        rng_devices,
                    )
                if before_backward is not None:
                    before_backward(state.step + 1, losses, out)
                t0 = time.perf_counter()
                info = optimizer.backward(losses, **kwargs)
                optimizer.step()
                t1 = time.perf_counter()
                state.step += 1
                state.batch_in_epoch = b + 1
                state.step_times.append(t1 - t0)
                state.iter_times.append(t1 - t_iter)
                accum.add(info, t1 - t0)
                state.weights_steps.append(_mean_weights(info.weights))
                if on_step is not None:
                    on_step(state.step, info)
                if bar is not None:
                    bar.update(1)
            if interrupted:
                break
            # ---- end of a complete epoch
            state.epoch += 1
            state.batch_in_epoch = 0
            rec = _epoch_record(state, accum, task_names, time.perf_counter() - t_epoch)
            rec["lr"] = float(optimizer.param_groups[0]["lr"])
            if state.epoch % eval_every == 0 or state.epoch == epochs:
                _evaluate_into(
                    rec,
                    state,
                    model,
                    valid,
                    tasks,
                    selection_metric,
                    eval_batch_size,
                    early_stopping_patience,
                )
            state.history.append(rec)
            if bar is not None:
                bar.set_postfix(epoch=state.epoch, score=f"{state.best_score:.4g}", refresh=False)
            state.accum = None
            if scheduler is not None:
                scheduler.step()
            last = state.stopped_early or state.epoch == epochs
            state.train_time_s = time.perf_counter() - t_start
            if last or state.epoch % checkpoint_every == 0:
                save(done=last)
            if state.stopped_early:
                break
        state.train_time_s = time.perf_counter() - t_start
        if interrupted:
            save(done=False)
            # evaluate the partial epoch for the returned result only (the checkpoint above
            # holds the state before this evaluation, so a resumed run is unaffected)
            if state.batch_in_epoch > 0 and state.accum is not None:
                rec = _epoch_record(state, state.accum, task_names, 0.0)
                rec["epoch"] = state.epoch + 1
                rec["partial"] = True
                _evaluate_into(
                    rec, state, model, valid, tasks, selection_metric, eval_batch_size, None
                )
                state.history.append(rec)
    finally:
        if bar is not None:
            bar.close()

    if restore_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
    valid_metrics = evaluate(model, valid, eval_batch_size)
    test_metrics = None
    test = getattr(splits, "test", None)
    if evaluate_test and test is not None and len(test) > 0:
        test_metrics = evaluate(model, test.to(dev), eval_batch_size)
    w = state.weights_steps
    weights_mean = (
        np.asarray(w, dtype=np.float64).mean(0).tolist() if w else [float("nan")] * k_tasks
    )
    return TrainResult(
        history=state.history,
        best_epoch=state.best_epoch,
        best_score=None if state.best_epoch is None else state.best_score,
        valid_metrics=valid_metrics,
        test_metrics=test_metrics,
        epochs=state.epoch,
        steps=state.step,
        stopped_early=state.stopped_early,
        step_time_s=_median(state.step_times),
        step_time_mean_s=_mean(state.step_times),
        iter_time_s=_median(state.iter_times),
        weights_mean=weights_mean,
        weights_trace=_thin(w, trace_points),
        train_time_s=state.train_time_s,
        task_names=task_names,
    )


def _epoch_record(
    state: _State, accum: _Accum, task_names: list[str], epoch_time: float
) -> dict[str, Any]:
    n = max(accum.count, 1)
    steps = accum.count + accum.skipped
    return {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": {
            name: (accum.loss_sum[k] / n if accum.count else float("nan"))
            for k, name in enumerate(task_names)
        },
        "weights_mean": [
            (accum.weight_sum[k] / n if accum.count else float("nan"))
            for k in range(len(task_names))
        ],
        "step_time_s": accum.step_time_sum / steps if steps else float("nan"),
        "epoch_time_s": epoch_time,
        "skipped": accum.skipped,
    }


def _evaluate_into(
    rec: dict[str, Any],
    state: _State,
    model: nn.Module,
    valid: Any,
    tasks: list[Any],
    selection_metric: Any,
    eval_batch_size: int,
    patience: int | None,
) -> None:
    t0 = time.perf_counter()
    metrics = evaluate(model, valid, eval_batch_size)
    score = selection_score(metrics, tasks, selection_metric)
    rec["valid"] = metrics
    rec["score"] = score
    rec["eval_time_s"] = time.perf_counter() - t0
    if math.isfinite(score) and score > state.best_score:
        state.best_score = score
        state.best_epoch = rec["epoch"]
        state.best_state = _clone_state_dict(model)
        state.bad_evals = 0
    else:
        state.bad_evals += 1
        if patience is not None and state.bad_evals >= patience:
            state.stopped_early = True
